"""More English text, written for this repository, to calibrate the sentence encoder on more than the 64 sentences of
trained_models.SENTENCES; none of it repeats or paraphrases those sentences."""

MORE_SENTENCES: tuple[str, ...] = (
    "The regulator has opened an investigation into whether the three largest supermarkets have been using their size "
    "to keep prices artificially high while paying farmers less for their produce, following hundreds of complaints.",
    "Drinking enough water is especially important for older people during a heatwave.",
    "I spent about two hours on the phone with the bank trying to find out why my card had been blocked, only to be "
    "told at the end that it was a routine security check that should never have been triggered.",
    "Our team's code review rule is simple: nothing gets merged without at least one approval.",
    "Her debut album was recorded in a converted barn in only eleven days.",
    "Tap water is safe to drink in the city, so there's no need to buy bottled water.",
    "How long does it take to get from the airport to the city centre by train?",
    "Mountain guides have warned walkers not to attempt the ridge this weekend, as a fresh fall of snow has covered "
    "the path and the risk of avalanches on the northern slopes is considerable.",
    "He spent most of his savings on a small, run-down farmhouse in the hills, and for the next five years he rebuilt "
    "it almost entirely with his own hands, learning each trade as he went.",
    "A lightning bolt is about five times hotter than the surface of the Sun.",
    "Fixed it, thanks.",
    "Running ten minutes late, sorry!",
    "The kids are finally asleep, so I'm going to watch something terrible on TV.",
    "Ministers insist the tax cut will pay for itself, but independent economists are not convinced.",
    "The first half was dull, with neither side willing to take a risk. Everything changed after the break, when the "
    "visitors scored twice in five minutes and the home crowd began to turn on their own players. A late consolation "
    "goal did little to lift the mood.",
    "The software update was meant to be installed automatically overnight, but on about one in ten of our office "
    "machines it stalled at 45 percent and had to be restarted manually the next morning.",
    "Highly recommended.",
    "We arrived in the village late at night and couldn't find the guesthouse anywhere. In the end an old man walking "
    "his dog took us there himself, chatting the whole way in a dialect we barely understood. The next morning the "
    "owner served us breakfast on a terrace overlooking the whole valley.",
    "Your call is important to us; you are currently number seven in the queue.",
    "I'd like to cancel my subscription, but I can't find the option anywhere in my account settings.",
    "If your laptop won't turn on, first check that the charger is connected properly and that the light on the "
    "adapter is on, then hold down the power button for thirty seconds and try again.",
    "We migrated the email system over the weekend, so you may need to set up your phone again.",
    "The marathon was won in two hours and four minutes, just outside the course record.",
    "Water expands when it freezes, which is why ice floats on lakes and rivers.",
    "The council has approved plans for 400 new homes on the site of the old paper mill.",
    "The local council has launched a consultation on plans to turn the disused railway line into a cycle path "
    "linking the town centre with the three villages to the north.",
    "Don't wait for me for dinner, the meeting is running over.",
    "The new guidelines recommend that adults aim for at least 150 minutes of moderate activity each week, such as "
    "brisk walking or cycling, along with muscle-strengthening exercises on two or more days.",
    "The negotiations over the new trade agreement are expected to last at least another year, with the two sides "
    "still divided over agricultural subsidies, fishing rights and the role of international courts.",
    "I'll take two.",
    "Tectonic plates move at roughly the speed at which fingernails grow.",
    "Could someone from IT look at the projector in meeting room B? It won't detect any laptops.",
    "The students designed and built a small satellite, about the size of a loaf of bread, which will be launched "
    "next spring and will measure air pollution over the country for at least two years.",
    "Everyone says that learning a language as an adult is hard, and they're right. But I've found that twenty "
    "minutes a day is far more useful than two hours at the weekend. The trick is to make it a habit, like brushing "
    "your teeth, so you don't have to think about it.",
    "When I was a student, I worked every summer at a campsite in the south of France, cleaning the showers in the "
    "morning and teaching children to swim in the afternoon, and I loved every minute of it.",
    "Call me back, please.",
    "The restaurant is small and a bit cramped, and you will probably have to wait for a table, but the handmade "
    "pasta is the best I have eaten outside Italy and the prices are very reasonable.",
    "The contract can be terminated by either party with thirty days' written notice.",
    "Blind-bake the pastry case for fifteen minutes so the base doesn't go soggy.",
    "Would it be possible to speak to a manager? I've explained this problem three times already.",
    "The build fails on the CI server but passes on my laptop, and I have no idea why.",
    "If you are travelling with children under the age of two, you can request a bassinet seat when you book, "
    "although these are limited and allocated on a first-come, first-served basis.",
    "Our tenancy agreement says that the deposit must be returned within ten days of the end of the lease. We moved "
    "out six weeks ago, left the flat spotless and have photos to prove it, but the landlord has stopped answering "
    "our messages. What can we do?",
    "Where's the nearest cash machine?",
    "The appeal will be heard by a panel of three judges in the spring.",
    "The tenant has the right to a written notice at least two months before the end of the lease.",
    "Last night's storm brought down power lines across the north of the county, leaving around 15,000 homes without "
    "electricity. Engineers have been working through the night, and the power company expects to reconnect most "
    "customers by this evening. Those still without power tomorrow will be offered compensation.",
    "Can I use plain yogurt instead of sour cream in this recipe?",
    "My knee has been aching for about a month, mostly when I go down stairs. There's no swelling and I haven't "
    "injured it as far as I know, but I run three times a week. Should I rest completely, or is it fine to keep "
    "running if the pain is mild?",
    "The rover collected rock samples that may contain traces of ancient microbial life.",
    "Temperatures will climb to 34 degrees on Thursday, so stay out of the midday sun if you can.",
    "At the beginning of the twentieth century, fewer than one in five homes in the country had electricity, and most "
    "people still relied on oil lamps, candles and coal fires for light and heat.",
    "The hacker group is thought to have gained access to the network through a phishing email sent to a junior "
    "employee, and then spent several weeks quietly copying customer records.",
    "A new blood test can detect several kinds of cancer before symptoms appear, according to early trials.",
    "Log in to the customer portal, select the account you want to change, choose the option to update your billing "
    "details, and enter the new card number and expiry date before saving.",
    "Hi Laura, thanks for sending the draft so quickly. I've added a few comments, mostly small things about wording, "
    "but I think section three needs a clearer summary of the costs. Could you take another look at that and send me "
    "a new version by Thursday? Thanks, Tom",
    "The choir is looking for tenors and basses; no audition is necessary, just enthusiasm.",
    "Chop the onions finely and fry them slowly in butter until golden, which takes at least twenty minutes.",
    "Mum says lunch is at one, so don't be late this time.",
    "After twelve seasons with the club, the captain announced his retirement on Friday.",
    "A 24-year-old man has been arrested on suspicion of stealing more than 300 bicycles from the station.",
    "Attached is the invoice for March; payment is due within 30 days.",
    "Bless you.",
    "The court ruled that the company had unfairly dismissed the employee and awarded her 28,000 pounds.",
    "To keep your bike in good condition, clean and oil the chain every few weeks, check the tyre pressure before "
    "long rides and have the brakes looked at by a mechanic at least once a year.",
    "The gallery's new exhibition brings together more than eighty portraits painted over four centuries.",
    "Whisk the egg whites until they form stiff peaks, then fold them gently into the melted chocolate.",
    "Tickets for the final sold out within twelve minutes of going on sale.",
    "The sculpture is made entirely from driftwood collected on local beaches.",
    "What time does it start?",
    "Never share your login details with anyone, even if they claim to be from the help desk.",
    "Much of what we know about daily life in Pompeii comes from graffiti scratched and painted on its walls.",
    "Light from the Sun takes a little over eight minutes to reach the Earth.",
    "Keep the change.",
    "If you find that your houseplants are dropping their leaves in winter, it is probably because the air is too dry "
    "from central heating or because they are standing too close to a cold window.",
    "The new keyboard shortcut for search is Ctrl+Shift+F.",
    "I'm so sorry about the mix-up with your booking. It looks as though our system gave your room to another guest "
    "when they extended their stay. We've upgraded you to a suite for the same price and added breakfast for both "
    "mornings. Please let us know if there is anything else we can do.",
    "Does anyone know a good plumber in the area who isn't too expensive?",
    "The merger will create the third-largest insurer in Europe, with around 30 million customers.",
    "My sourdough starter finally smells like yogurt instead of paint thinner.",
    "Please let me know by Wednesday whether you'll be able to attend the workshop.",
    "The castle changed hands four times during the civil war.",
    "Stir in the cheese off the heat so it melts smoothly instead of turning stringy.",
    "If the swelling doesn't go down in two days, come back and we'll arrange an X-ray.",
    "Sound travels about four times faster in water than in air.",
    "Returns are free within 30 days as long as the item is unused and in its original packaging.",
    "The novel, set in a small hotel on the Italian coast in the summer of 1956, is a gentle comedy about a group of "
    "guests who all have something to hide from each other.",
    "Students who miss more than three lectures without an excuse will not be allowed to sit the exam.",
    "Meeting moved to 3 pm.",
    "Attach the shelf brackets to the wall first, then check that they are level before adding the shelf.",
    "The orchestra has been rehearsing the new symphony for three weeks, and the composer, who is ninety-one, has "
    "attended every session, often stopping the musicians to change a single note in the score.",
    "Please make sure you have read and understood the safety instructions before using the machine, and never try to "
    "remove a blockage while the motor is running or the plug is connected.",
    "She broke the national record in the 400 metres at only seventeen years old.",
    "The team sacked its manager after a run of seven defeats in eight matches.",
    "Please remember that your tax return must be submitted by 31 January to avoid a penalty.",
    "Working from home two days a week is the best compromise I've found.",
    "Just landed, will call you once I'm through passport control.",
    "You are entitled to see a copy of any personal data that the company holds about you.",
    "The cooking class starts at six and lasts about three hours, during which you will prepare a three-course meal "
    "under the guidance of a professional chef and then sit down to eat it together.",
    "The hurricane has weakened to a tropical storm but is still bringing torrential rain to the coast.",
    "For the price, this coffee machine makes a surprisingly good espresso.",
    "The town was founded by fishermen in the twelfth century and grew rich on the herring trade. When the herring "
    "disappeared in the 1800s, it reinvented itself as a seaside resort, complete with a pier, a bandstand and grand "
    "hotels along the front. Today most of those hotels have been turned into flats.",
    "Our new neighbours are lovely, but they have a toddler who seems to wake up at five every morning and "
    "immediately start banging a saucepan with a wooden spoon, which we can hear through the wall.",
    "The vaccine trial enrolled nearly 40,000 volunteers in six countries, half of whom received the vaccine and half "
    "a placebo, and neither the participants nor the doctors knew who had been given which.",
    "Did you remember to book the table for Saturday?",
    "Astronomers believe our galaxy contains more than a hundred billion stars.",
    "The university has introduced a new degree in data science, starting this autumn.",
    "Please arrive fifteen minutes before your appointment and bring a list of your current medications.",
    "The painter spent the last twenty years of her life on a remote island off the west coast of Ireland, where she "
    "produced hundreds of small studies of the sea, the sky and the changing light.",
    "Before you call us, please check that the device is switched on at the wall and that the cable is firmly plugged "
    "in at both ends. Then unplug it for thirty seconds and plug it back in. If the light is still red after five "
    "minutes, call our support line and have your account number ready.",
    "Under the new law, landlords must register every rental property with the local council.",
    "The city's population doubled between 1850 and 1900 as factories drew workers from the countryside, and the "
    "crowded, poorly drained housing that resulted led to repeated outbreaks of cholera and typhoid.",
    "If you're visiting in August, book accommodation months in advance because everything fills up.",
    "Rising sea temperatures are causing many fish species to move towards the poles in search of cooler water, which "
    "is forcing fishing fleets to travel further and creating disputes over quotas.",
    "Congratulations on the promotion!",
    "The minister denied any wrongdoing and said she would cooperate fully with the investigation.",
    "We understand how frustrating it is when a delivery doesn't arrive on time, and we have passed your complaint to "
    "the courier so that they can investigate what went wrong with parcel number 7781-A.",
    "A weak cold front will move through on Tuesday, bringing a brief spell of drizzle and a fresher breeze.",
    "Schools across the region will stay closed tomorrow because of the heavy snowfall.",
    "Honestly, I was sceptical about meal kits before I tried one, but the recipes are easy, the portions are "
    "generous, and I've wasted far less food since I stopped buying ingredients I never use.",
    "Season the steak generously and let it rest for five minutes before you slice it.",
    "Emergency services were called to the beach shortly after four o'clock when two swimmers got into difficulty in "
    "strong currents; both were rescued by lifeguards and taken to hospital as a precaution.",
    "I'm out of the office until 4 August with limited access to email.",
    "Can I bring liquids in my hand luggage if they're under 100 ml?",
    "Although electric cars are more expensive to buy than petrol models, lower running costs mean that many drivers "
    "recover the difference within five or six years, especially if they can charge at home.",
    "Bats find their way in the dark by sending out high-pitched calls and listening for the echoes.",
    "The replacement arrived today, and this time everything works perfectly.",
    "The film won three awards at the festival, including best director for a woman making her first feature.",
    "The strike by junior doctors has forced hospitals to cancel almost 30,000 appointments this week.",
    "I've been using this standing desk for six months now, and while it took some time to get used to, my back pain "
    "has almost completely gone and I feel far less tired in the afternoons.",
    "The cyclist crashed on a wet descent but got back on his bike and finished the stage.",
    "After the storm, volunteers from across the region arrived with chainsaws, generators and hot food, and within "
    "two days most of the roads into the valley had been cleared of fallen trees.",
    "The jury took less than four hours to reach a unanimous verdict.",
    "Sounds good to me.",
    "The battery easily lasts two days, but the camera struggles in low light.",
    "The landlord is responsible for repairs to the structure and exterior of the property, including the roof, "
    "walls, windows and drains, as well as for keeping the heating and hot water systems in working order.",
    "The national park covers almost 2,000 square kilometres of forest, lakes and mountains, and is home to bears, "
    "wolves and lynx, although visitors are very unlikely to see any of them.",
    "I'm writing to complain about the state of the pavement outside number 42 Elm Road, which has been broken for "
    "months and where my elderly mother tripped and hurt her wrist last Tuesday.",
    "The children spent the morning at the science museum, where they built a simple electric circuit, watched a "
    "demonstration with liquid nitrogen, and asked the guide far more questions than she had time to answer.",
    "Tighten the wheel nuts in a star pattern to make sure the wheel sits evenly.",
    "Sign the form on both pages and return it in the prepaid envelope.",
    "Dear Ms Patel, thank you for your email of 12 June; please find the signed contract attached.",
    "The Vikings reached North America around the year 1000, nearly five centuries before Columbus.",
    "The agreement requires both companies to keep the terms of the deal confidential, but sources close to the "
    "negotiations say that the price was significantly lower than the 2 billion dollars originally asked.",
    "Shipping was fast.",
    "Drive safely.",
    "When my grandmother came to this country in 1962, she spoke almost no English and had only one suitcase. She "
    "found work in a clothing factory, went to evening classes three nights a week, and ten years later opened her "
    "own tailoring shop. It is still there, run by my uncle.",
    "This is the third kettle I've bought from this brand, and none of them has let me down.",
    "The match was halted for twenty minutes in the second half after a group of supporters threw flares onto the "
    "pitch, and the club now faces a heavy fine and possibly a stadium closure from the league.",
    "Sitting for long periods without a break is linked to back pain and poor circulation.",
    "Dinner's ready!",
    "What's the best way to remove red wine from a wool carpet?",
    "The study, which followed more than 20,000 adults for over a decade, found that those who walked at least 7,000 "
    "steps a day had a significantly lower risk of dying early than those who walked fewer than 4,000.",
    "The mayor resigned on Tuesday after an audit found that nearly two million pounds of public money had gone "
    "missing.",
    "If you need to reschedule your appointment, please call the surgery at least 24 hours in advance so that the "
    "slot can be offered to another patient; missed appointments cost the health service millions each year.",
    "The city was almost completely rebuilt after the great fire of 1666.",
    "My physiotherapist says the knee should be back to normal in about six weeks.",
    "Hi Sam, I've looked through the error logs you sent, and it looks like the service is running out of database "
    "connections during the nightly import, so I'd suggest raising the pool size and adding a retry.",
    "Cases of measles have risen sharply this year, and health officials are urging parents to check their children's "
    "vaccinations.",
    "My sister just had her baby, a girl, three point four kilos!",
    "The instructions were confusing, and two screws were missing from the box.",
    "I've worked from home for three years now. At first I loved not commuting, but after a few months I realised how "
    "much I missed the small conversations in the kitchen and the corridor. These days I go into the office twice a "
    "week, mainly to see people.",
    "We're thinking of painting the living room a pale green; what do you think?",
    "The company's shares jumped 14 percent after it reported better-than-expected profits.",
    "Rinse the filter under cold running water once a month; do not use detergent.",
    "Please note that, due to essential engineering work, there will be no trains between Reading and Swindon on "
    "Sunday 14 July, and replacement buses will add up to an hour to journey times.",
    "The committee heard evidence from teachers, parents and pupils before recommending that mobile phones be banned "
    "during lessons but allowed at lunchtime, arguing that a total ban would be impossible to enforce.",
    "The prime minister is expected to announce a cabinet reshuffle before parliament returns in September.",
    "When the Romans withdrew from Britain in the early fifth century, many of the towns they had built were "
    "gradually abandoned, and it would be several hundred years before urban life recovered.",
    "According to the police report, the driver had been awake for more than twenty hours when his van drifted across "
    "the central reservation and collided with a coach heading in the opposite direction.",
    "Remove the back cover, insert two AA batteries, and make sure the plus signs face upwards.",
    "The James Webb telescope can see galaxies that formed only a few hundred million years after the Big Bang.",
    "The medieval town walls, most of which survive intact, can be walked in about an hour, and there are fine views "
    "over the rooftops and the surrounding vineyards from the tower above the northern gate.",
    "After a cold start, it will turn into a bright and crisp autumn day with light winds.",
    "The view from the top of the tower is worth the 300 steps, but go early to avoid the queues.",
    "The course is aimed at complete beginners and no previous experience is needed. Over eight weekly sessions you "
    "will learn the basics of drawing, from holding a pencil to shading and perspective. All materials are provided, "
    "and classes are limited to twelve people.",
    "Why do onions make you cry when you cut them?",
    "Marinate the chicken in yogurt, garlic and paprika for at least two hours, or overnight if you can.",
    "I returned this vacuum cleaner after a week because it kept losing suction.",
    "Ancient Egyptians used a calendar of 365 days, divided into twelve months of thirty days plus five extra days.",
    "I'm at the supermarket; do we need anything else for tonight?",
    "The VPN keeps disconnecting every ten minutes when I work from home.",
    "Heavy hail damaged cars and greenhouses across the south of the county on Saturday afternoon.",
    "Could you explain the difference between weather and climate to a ten-year-old?",
    "No worries at all.",
    "The guided walking tour leaves from the fountain every day at ten and lasts about two hours.",
    "The forecast for the weekend is mixed: Saturday should stay mostly dry with sunny spells in the east, but a band "
    "of heavy rain will push in from the west on Sunday morning, bringing strong winds to exposed coasts.",
    "Can you pick up some milk and bread on your way home?",
    "Honestly, I think the new logo looks worse than the old one.",
    "The ferry ran aground shortly after leaving port, but all 212 passengers were brought safely to shore.",
    "The hotel was in a great location, right next to the beach and a short walk from the harbour, but our room "
    "overlooked the kitchen extractor fans and the noise kept us awake until well after midnight.",
    "The pharmacist told me not to take ibuprofen on an empty stomach.",
    "Authorities have issued a boil-water notice for about 60,000 homes after bacteria were found in the supply.",
    "The cheapest way to get around the islands is by local ferry, which is slow and often crowded but runs several "
    "times a day, costs a fraction of the price of a flight and offers wonderful views.",
    "The tie-break went on for nearly half an hour before she finally converted her sixth match point.",
    "The spam filter has started sending all our invoices from suppliers to the junk folder.",
    "She finished fourth in her first Olympics and won gold at the next one four years later.",
    "The judge said that, while she accepted the defendant was genuinely remorseful, the seriousness of the offence "
    "and the harm caused to the victims meant that a custodial sentence was unavoidable.",
    "The database query takes almost a minute because there is no index on the customer ID column.",
    "We'd love to come to the wedding in June, but my brother is getting married the same weekend in Scotland, so I'm "
    "afraid we'll have to send our best wishes from there.",
    "We're sorry for the inconvenience and have issued a full refund to your original payment method.",
    "Turnout in the local elections was just 31 percent, the lowest since records began.",
    "Researchers at the university have developed a cheap paper-based sensor that can detect contaminated drinking "
    "water within minutes, which could make testing much easier in remote areas without laboratories or trained "
    "staff.",
    "Our luggage went to Frankfurt while we went to Vienna.",
    "The central argument of the book is that cities grew rich not because of their natural resources but because "
    "they brought large numbers of people close enough to share ideas, skills and trust.",
    "Is it normal for a three-month-old puppy to sleep most of the day?",
    "The village school, which has just twenty-three pupils, is facing closure at the end of the year. Parents say "
    "that losing it would force young families to leave and turn the village into a place for holiday homes. The "
    "council will make its final decision in November.",
    "Our analysis shows that customers who contact support within their first week are three times more likely to "
    "renew their subscription, so next quarter we are going to invest much more in onboarding.",
    "Applications for the scholarship must be submitted online by 15 April.",
    "After months of planning, the expedition finally set off from the coast in late November, pulling sledges loaded "
    "with food, fuel and scientific equipment across more than a thousand kilometres of ice.",
    "The bank will charge a fee of 2.5 percent on any card payments made abroad.",
    "This soup freezes well, so I usually make a double batch on Sundays.",
    "The dog ate half a birthday cake when nobody was looking.",
    "Children who grow up bilingual often mix the two languages at first, but research suggests that this is a normal "
    "stage of development and not a sign of confusion or delay in learning to speak.",
    "The price of gold hit a record high as investors looked for a safe place to put their money.",
    "Could you tell me when my parcel will be delivered? The tracking page hasn't changed in four days.",
    "The witness said she had seen a man in a grey hoodie running from the shop at about 11 pm.",
    "Because the bread is made with a slow overnight fermentation, it has a deeper flavour and keeps fresh for longer "
    "than ordinary supermarket loaves, which are usually mixed, proved and baked within a few hours.",
    "The marathon route starts at the harbour, loops twice around the old town, follows the river for about ten "
    "kilometres, and finishes in front of the cathedral, where a brass band plays for the runners.",
    "I ordered a blue sweater in size medium but received a red one in large.",
    "I'd rather pay a bit more for vegetables that were grown locally.",
    "Order confirmed.",
    "I think the memory leak is in the image cache, because usage only grows when thumbnails load.",
    "A spokesman for the airline said that the cancellations had been caused by a shortage of air traffic controllers "
    "rather than by its own staff, and that passengers would be offered refunds or free rebooking.",
    "The region produces around a third of the country's wine, and most of its vineyards are still run by families "
    "who have worked the same land for generations and sell directly to local restaurants.",
    "The pyramids at Giza were already ancient by the time of the Roman Empire.",
    "The exhibition, which opens on 3 October and runs until the end of February, explores how artists in the 1920s "
    "responded to the rapid spread of cars, telephones, radio and electric light in everyday life.",
    "Bring an umbrella tomorrow; thunderstorms are likely from mid-afternoon onwards.",
    "Dear customer, we are writing to let you know that your contract ends on 30 September. If you do nothing, it "
    "will roll over to our standard tariff, which is currently 18 percent more expensive. To stay on a fixed price, "
    "simply log in and choose a new plan before that date.",
    "We rented bikes for the day and cycled along the canal all the way to the next village.",
    "The Silk Road connected traders from China to the Mediterranean for more than a thousand years.",
    "The sequel is fine, but it doesn't come close to the original.",
    "Welcome aboard!",
    "Good luck on Friday!",
    "Squeeze half a lemon over the fish just before serving.",
    "The bug only appears when two users edit the same record within a second of each other. The second save silently "
    "overwrites the first, and nothing is logged. I've added a version check so that the second request now fails "
    "with a conflict error, and the client shows a message asking the user to reload.",
    "I accidentally deleted a shared folder; is there any way to get it back?",
    "I've ordered from this shop four times now, and each time the parcel has arrived within two days, beautifully "
    "packed and with a handwritten thank-you note, which is a lovely touch.",
    "The festival was a huge success this year, with more than 15,000 visitors over three days, and the organisers "
    "have already announced that next year's event will be extended to a fourth day.",
    "Economists say that the recent fall in unemployment hides a less encouraging picture, with many of the new jobs "
    "being part-time, temporary or paid at close to the minimum wage.",
    "Black holes are regions of space where gravity is so strong that nothing, not even light, can escape. They form "
    "when very massive stars collapse at the end of their lives. Although they cannot be seen directly, astronomers "
    "can detect them by their effects on nearby stars and gas.",
    "The Northern Lights could be visible as far south as Manchester tonight if the sky stays clear.",
    "Our servers will be down for scheduled maintenance from 2 am to 4 am on Sunday.",
    "If you're planning to drive across the mountains in winter, carry chains, a shovel, warm blankets and enough "
    "food and water for a day, and always tell someone your route and expected arrival time.",
    "The swimmer touched the wall a hundredth of a second ahead of the defending champion.",
    "Check-in closes forty-five minutes before departure, and there are no exceptions.",
    "Which is better for a beginner, a road bike or a hybrid?",
    "We've been having trouble with the shared calendar since the migration: some meetings appear twice, others have "
    "disappeared entirely, and invitations sent from phones are arriving with the wrong time zone.",
    "I set up a standing order so that 200 pounds goes into my savings account every payday.",
    "How much is this?",
    "This course introduces the basic principles of accounting, including how to read a balance sheet, how to prepare "
    "a cash-flow forecast and how to calculate the profitability of a small business.",
    "Thank you for taking part in our survey; your answers will help us improve our services, and as a small token of "
    "our appreciation you will receive a 10 percent discount on your next order.",
    "I'm really sorry, but I won't be able to make it to your party on Saturday after all; my daughter has come down "
    "with a high temperature and I don't want to leave her with a babysitter.",
    "The blender is powerful and easy to clean, though it is very loud.",
    "Not bad at all.",
    "Out of stock.",
    "Parents' evening is on Thursday from 5 to 8 pm in the main hall.",
    "Rescue teams pulled eleven people alive from the rubble of the collapsed apartment block overnight.",
    "Before signing any agreement, read the small print carefully, pay particular attention to cancellation terms and "
    "automatic renewals, and don't be afraid to ask for anything you don't understand to be explained in writing.",
    "See you tomorrow.",
    "The team behind the app say it has been downloaded more than five million times since its launch in January, but "
    "they have yet to find a way of making money from it without adding adverts.",
    "Please hold.",
    "The government has promised to build 300,000 new homes a year, but critics point out that the target has been "
    "missed every year for the past decade and that building costs are still rising.",
    "A spokesperson for the company declined to comment on reports that it plans to close its factory in Leeds.",
    "Keep fresh herbs in a glass of water in the fridge and they'll last much longer.",
    "Five stars: the tent went up in ten minutes and stayed dry through a night of heavy rain.",
    "Mild dehydration can cause headaches, tiredness and difficulty concentrating.",
    "That's outrageous.",
    "The clinic offers free flu vaccinations to anyone over 65 from the first week of October.",
    "Our engineering team has identified the cause of yesterday's outage as a faulty configuration change that was "
    "deployed to all regions at once, and we are changing our process so that updates roll out gradually.",
    "Solid little drill; it went straight through brick without any trouble.",
    "How much notice do I have to give my employer before I resign?",
    "Officials say the new airport terminal will open in March, two years later than planned and well over budget.",
    "The festival will feature more than 200 performers from 30 countries.",
    "Photography is not allowed inside the exhibition, but sketching is encouraged.",
    "After weeks of speculation, the football club confirmed on Thursday evening that it had agreed to sell its star "
    "striker to a Spanish rival for a fee believed to be around 80 million euros, including add-ons.",
    "I think people should be allowed to bring their dogs into more shops and restaurants.",
    "For the best results, paint the walls in the morning when the light is good, apply two thin coats rather than "
    "one thick one, and leave at least four hours between them so the first coat can dry.",
    "Ten out of ten.",
    "Cycling to work is faster than driving once you count the time spent looking for parking.",
    "Fog will be slow to clear this morning, with visibility below 100 metres in some places.",
    "Inflation eased to 3.2 percent in May, mainly because of lower energy prices.",
    "The first transatlantic telegraph cable was laid in 1858 but failed after only a few weeks.",
    "We missed our connection in Zurich and had to wait six hours for the next train to Milan.",
    "The support team was friendly and helpful, but it took them almost three weeks and five separate emails to sort "
    "out a problem that, in the end, was caused by a typo in my postcode.",
    "If the risotto looks dry, add another ladle of hot stock and keep stirring.",
    "Happy birthday, Grandma!",
    "Unfortunately, this product is no longer covered by the manufacturer's warranty.",
    "Merge conflicts again; who changed the config file without telling anyone?",
    "The ferry crossing was rough, and half the passengers spent it leaning over the rail.",
    "What should I do if my flight is overbooked and I'm refused boarding?",
    "Lovely weather today.",
    "Have you tried clearing your browser cache and logging in again?",
    "In the final quarter the visitors came back from twelve points down to win by three, with their point guard "
    "scoring eleven points in the last four minutes of the game to silence the home crowd.",
    "Although the earthquake was relatively moderate in strength, its shallow depth and the poor quality of many "
    "buildings in the area meant that the damage was far worse than experts had expected.",
    "Does this ticket include the return journey, or do I have to buy that separately?",
    "Good night, sleep well.",
    "Start by laying out all of the parts on a clean floor and checking them against the list on page two, because it "
    "is much easier to spot a missing piece now than halfway through the assembly.",
    "Enzymes speed up chemical reactions without being used up themselves.",
    "The Berlin Wall fell in November 1989, less than a year before Germany was reunified.",
    "The reading list for the course includes twelve novels, most of them from the nineteenth century.",
    "I left my charger at your place; could you bring it on Thursday?",
    "Guess who I bumped into at the airport? Your old maths teacher!",
    "The screen is bright and sharp, but the speakers sound tinny at high volume.",
    "Let me know when you're outside and I'll come down.",
    "The pollen count is very high today, which is bad news for anyone with hay fever.",
    "Thank you for your patience; a member of our team will reply within two working days.",
    "Can you share your screen? I can't see the spreadsheet you're talking about.",
    "Her poems are short, funny and surprisingly sad once you read them a second time.",
    "In the nineteenth century, coffee houses in many European cities served as informal offices, libraries and "
    "debating halls, where merchants, writers and politicians met to read newspapers and argue about the news.",
    "You'll need a visa to enter the country, and it can take up to three weeks to process.",
    "Scientists still do not fully understand why we dream, but one leading theory suggests that dreaming helps the "
    "brain sort and store memories from the previous day and process difficult emotions.",
    "Our records show that the payment was received on 2 May, but it was allocated to the wrong account because the "
    "reference number was incomplete; we have now corrected this and removed the late fee.",
    "I found the first half of the film slow, but the ending was absolutely worth it.",
    "The interest rate on the savings account is fixed for the first twelve months, after which it will fall to the "
    "bank's standard variable rate unless you move your money into a new product.",
    "Two-factor authentication will be mandatory for all staff accounts from 1 March.",
    "It's been the driest spring in fifty years, and farmers are already worried about the harvest.",
    "The exam consists of two papers of ninety minutes each, one on grammar and vocabulary and one on reading "
    "comprehension, followed by a short oral test with an examiner about a week later.",
    "DNA carries the instructions that cells use to build proteins.",
    "The football season was suspended for three months in 2020, and when it resumed, matches were played in empty "
    "stadiums, with recorded crowd noise piped in for viewers watching at home.",
    "Following our call this morning, I've attached the revised budget for your review.",
    "The opposition has called for an independent inquiry into the awarding of the contract.",
    "Please find attached the minutes of Tuesday's board meeting, with the action points highlighted.",
    "The night bus from Madrid to Lisbon takes about nine hours and costs around 40 euros.",
    "Please hand in your essays by Monday; late submissions will lose ten percent.",
    "In case of fire, leave the building by the nearest exit and do not use the lifts.",
    "Great match last night!",
    "The school will close early on Friday so that teachers can attend a training day.",
    "The play runs for just under three hours, with one interval.",
    "Is it possible to change the delivery address after the order has been dispatched?",
    "The headphones are great for travel, but the ear cushions started peeling after four months.",
    "Grandad's eightieth birthday party went brilliantly; he danced with every one of his great-grandchildren, gave a "
    "speech that made everyone cry, and was still going strong at midnight when the last guests left.",
    "Despite a strong start to the year, the retailer warned investors that sales in the crucial Christmas period had "
    "been weaker than expected, sending its shares down by nearly a fifth in early trading.",
    "Before you take out a loan, compare the annual percentage rate rather than the monthly payment.",
    "The researchers warned that, although the results were promising, the trial was small and short, and much larger "
    "studies would be needed before the treatment could be recommended for general use.",
    "Let me check.",
    "What is the difference between a virus and a bacterium?",
    "I've been charged twice for the same order, reference 48213, and I'd like one payment reversed.",
    "Police have closed the northbound lanes of the A1 after a lorry overturned near junction 34.",
    "Heat the oil in a large pan and fry the onion, garlic and ginger for five minutes. Add the spices and cook for "
    "another minute, stirring constantly so they don't burn. Pour in the tomatoes and coconut milk, simmer for twenty "
    "minutes, then add the prawns and cook until they turn pink.",
    "Press and hold the power button for five seconds to switch the device off completely.",
    "Jury service is compulsory, but you can ask to defer it if the dates are impossible for you.",
    "Prices in the city's restaurants have risen sharply this year, partly because of higher energy bills and food "
    "costs, and partly because many kitchens are struggling to recruit and keep staff.",
    "Happy anniversary, you two! Twenty-five years and still laughing at each other's jokes.",
    "Our daughter finally understands fractions after weeks of practising with pizza slices.",
    "He was fined 500 euros and banned from driving for six months.",
    "Roast the squash with a little oil, chilli and honey until it is soft and caramelised at the edges, then scatter "
    "it over the salad with the toasted seeds, crumbled feta and a handful of fresh mint.",
    "I paid off the last of my student loan today, eleven years after graduating!",
    "The hospital has opened a new wing with forty additional beds and a dedicated unit for older patients, which "
    "managers hope will reduce the long waits that have become common in the emergency department.",
    "Not today, thanks.",
    "The scientists placed cameras at forty sites across the forest and, over eighteen months, recorded more than 300 "
    "different species, including a wild cat that had not been seen in the area for decades.",
    "Who's driving tonight?",
    "Are you still up for a walk tomorrow if it's not raining?",
    "Hi team, just a reminder that timesheets are due by noon on Friday.",
    "The bridge was closed to traffic in May after engineers discovered serious corrosion in its steel cables. "
    "Repairs were expected to take six weeks, but they are now likely to continue until the spring. In the meantime, "
    "drivers face a detour of almost twenty miles.",
    "The treaty of 1648 ended decades of war in central Europe and established the principle that each state had the "
    "right to decide its own religion, an idea that shaped European diplomacy for centuries.",
    "Our hostel in Krakow was cheap, clean and only a five-minute walk from the old town.",
    "I know it's not a popular opinion, but I think the city was right to close the road to traffic, because the "
    "square is now full of people in the evenings instead of idling cars.",
    "In my view, the city should spend the money on buses rather than another car park.",
    "When the power came back on after six hours, we discovered that everything in the freezer had thawed, so we "
    "invited the neighbours round and cooked a huge dinner before it went to waste.",
    "Share prices fell across Asia on Monday morning as investors reacted to weak manufacturing data from China. The "
    "Nikkei closed down 2.3 percent, while Hong Kong's Hang Seng lost nearly 3 percent. Analysts expect further "
    "volatility ahead of the central bank's meeting next week.",
    "Is there step-free access at the station, or only stairs?",
    "He has scored in each of his last six games and is now the league's top scorer.",
    "Not worth 60 dollars; the fabric is thin and the stitching came loose after the first wash.",
    "The patent expired last year, so other manufacturers can now produce the drug.",
    "Apologies for the slow reply; I've been travelling all week and am only now catching up.",
    "Scientists have warned that the heatwave could kill millions of fish in the shallow lakes.",
    "If you notice any unusual activity on your account, such as payments you don't recognise or emails asking you to "
    "confirm your details, contact us immediately on the number printed on the back of your card.",
    "Do I need a lawyer to write a will, or can I do it myself online?",
    "Ticket closed.",
    "Please update to version 4.2.1, which fixes the security flaw reported last week.",
    "We are delighted to announce that the new community library will open on Saturday 5 April, with storytelling "
    "sessions for children, free coffee for everyone and a chance to meet the local authors who helped design it.",
    "My doctor suggested that I cut down on coffee, go to bed at the same time every night and avoid screens for an "
    "hour before sleep, and after a fortnight I already feel much more rested.",
    "My laptop fan makes a loud grinding noise whenever I open more than a few tabs.",
    "Our under-twelves won the regional tournament without conceding a single goal.",
    "He is learning Japanese for his trip next year and practises with an app for twenty minutes a day.",
    "Fill in section B only if you have lived at your current address for less than three years.",
    "The government announced on Monday that it would provide emergency grants to farmers whose crops have been "
    "destroyed by the flooding, although many say the money will arrive far too late to save their businesses.",
    "Apply a thin layer of glue to both surfaces and wait two minutes before pressing them together.",
    "House prices in the city have risen by a third since 2019, pricing many young buyers out.",
    "Our landlord finally fixed the boiler after three weeks of cold showers.",
    "The secret to crispy roast potatoes is to shake them in the pan after boiling so the edges go fluffy.",
    "She had planned to spend a quiet weekend reading in the garden, but her sister arrived on Friday night with "
    "three children, a dog and a broken car, and the weekend turned out very differently.",
    "Could we push Thursday's meeting back by half an hour? Something has come up.",
    "Children should get at least an hour of physical activity every day.",
    "To make the dressing, whisk together three tablespoons of olive oil, one tablespoon of red wine vinegar, a "
    "teaspoon of mustard and a small crushed clove of garlic, then season with salt and pepper to taste.",
    "The company has apologised after thousands of customers were left without internet access for most of Tuesday, "
    "and says it will automatically credit affected accounts with one week's free service.",
    "The cricket season starts in April, and the club is looking for new players of all ages.",
    "Happy New Year!",
    "The latest update to the operating system includes a redesigned notification panel, better battery management "
    "and several security fixes, but some users have reported that it slows down older devices noticeably.",
    "Salt lowers the freezing point of water, which is why it is spread on icy roads.",
    "More than 4,000 workers at the port walked out on Monday in a dispute over pensions.",
    "Women in New Zealand won the right to vote in 1893, earlier than in most other countries.",
    "Take one tablet twice a day with food, and finish the whole course even if you feel better.",
    "Once the water has boiled, turn the heat down to a gentle simmer, add the rice, cover the pan with a "
    "tight-fitting lid, and leave it undisturbed for twelve minutes before fluffing it with a fork.",
    "The museum's collection of scientific instruments includes telescopes, microscopes, early calculating machines "
    "and a clock that was once used to set the official time for the whole country in the days before radio time "
    "signals.",
    "The library's study rooms can be booked for up to three hours at a time during exam season.",
    "The national census shows that the population of the capital has grown by 12 percent in a decade.",
    "Most shops in the village close for a long lunch between one and four.",
    "Cloud providers charge for storage, computing time and data leaving their networks, so a system that looks cheap "
    "during testing can become surprisingly expensive once thousands of customers start using it.",
    "The coupon code didn't work at checkout, even though it says it's valid until the end of the month.",
    "The euro fell to its lowest level against the dollar in almost two years.",
    "Pension contributions are deducted from your salary before tax, which makes them very efficient.",
    "Thousands gathered in the main square on Saturday to protest against the proposed pension reforms.",
    "My blood pressure was a bit high at the last check-up, so the nurse wants to see me again in a month.",
    "Soak the chickpeas overnight and cook them for about an hour until they are soft.",
    "This is the best vacuum cleaner I've owned. It's light enough to carry up the stairs with one hand, the battery "
    "lasts for the whole house, and it picks up dog hair from the carpet in a single pass. My only complaint is that "
    "the bin is small and needs emptying often.",
    "Rain delayed the start of play by two hours, but the match was completed before bad light.",
    "Overnight lows of minus eight mean the lake could freeze over for the first time since 2010.",
    "Hello, I'm calling about the broadband installation that was supposed to happen this morning.",
    "Boarding now.",
    "The experiment was repeated in three independent laboratories, and all of them got the same result.",
    "Terrible customer service.",
    "The ballet company is touring six cities this winter with a new production of Swan Lake.",
    "Tutors are available for drop-in sessions every Tuesday and Thursday afternoon.",
    "The new speed limit of 20 miles per hour comes into force across the city centre on Monday.",
    "Is it raining there?",
    "We regret to announce that this evening's performance has been cancelled due to the illness of a lead actor. "
    "Ticket holders will be contacted by email and offered either a full refund or seats for another date. We "
    "apologise for any disappointment this may cause.",
    "Although the home side dominated possession for most of the afternoon, they struggled to create clear chances "
    "against a well-organised defence and were eventually punished by a counter-attack in the eighty-ninth minute.",
    "Under the proposed rules, anyone who earns more than 1,000 pounds a year from selling goods online would have to "
    "declare that income to the tax authority, a change that has alarmed many small traders.",
    "Some species of tardigrade can survive being dried out for decades and then revive in water.",
    "A yellow warning for snow and ice is in place across the Highlands until noon on Sunday.",
    "The referee's decision to disallow the goal was overturned after a video review.",
    "The price of the ticket includes entry to all of the exhibitions, a guided tour of the walled gardens and a cup "
    "of tea or coffee in the old stable block, which has been converted into a tea room.",
    "Nice try.",
    "I can't believe it's already December; where did this year go?",
    "The shared drive is almost full, so please delete any old files you no longer need.",
    "Voters in three states will decide next month whether to raise the minimum wage to $17 an hour.",
    "The app crashes every time I try to upload a photo larger than 10 MB.",
    "Back in five minutes.",
    "Sorry I missed your call, I was in the shower.",
    "Comfortable shoes, but they run small, so order half a size up.",
    "Same here.",
    "Check your inbox.",
    "The telescope detected water vapour in the atmosphere of a planet 120 light years away.",
    "People underestimate how much a good mattress changes your life.",
    "Which platform, please?",
    "Every pupil in the class planted a tree, and they will measure its growth each term.",
    "The printing press made books cheaper and helped spread new ideas across Europe in the sixteenth century.",
    "The two leaders met for ninety minutes but failed to agree on a timetable for the withdrawal of troops.",
    "Keep a photocopy of your passport separate from the original in case it gets lost or stolen.",
    "I started learning the piano at forty-five, and although I'll never be a concert pianist, playing for half an "
    "hour every evening has become the most relaxing part of my day.",
    "Totally agree.",
    "Any update on this?",
    "My grandfather worked on the railways for forty-one years, starting as a cleaner at the age of fifteen and "
    "retiring as a station master, and he could still tell you the timetable of every local line.",
    "He taught himself to paint in watercolour by copying landscapes from old postcards.",
    "Toast the cumin seeds in a dry pan until they smell fragrant, then grind them.",
    "Our monthly budget for groceries is about 450 dollars, and we went over it again.",
)

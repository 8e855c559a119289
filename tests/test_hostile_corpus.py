"""Every model of the hostile corpus (tests/hostile_models.py) through optimize, bench and compare.

The corpus runs once, in one process under strace (file opens and sockets traced), and each case is then
checked: one `error:` line and a non-zero exit, or a correct result; nothing read outside the model's folder;
no socket opened; nothing left behind; the input unchanged. Without strace the trace checks are skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hostile_models import CASES  # noqa: E402

RUNNER = Path(__file__).parent / "hostile_corpus.py"
STRACE = shutil.which("strace")
# Paths a command may never try to open: the secret's folder, links that lead out, a FIFO, absolute escapes.
FORBIDDEN = re.compile(r"/outside/|escape_|pipe\.bin|/dev/zero|/\.\./|/etc/passwd")
OPEN_CALL = re.compile(r'^\d+\s+(?:open|openat|openat2|creat)\((?:AT_FDCWD, |\d+, )?"([^"]*)"')
INET_SOCKET = re.compile(r"^\d+\s+(?:socket\(AF_INET6?|connect\(\d+, \{sa_family=AF_INET)")
MARK = re.compile(r"/\.marks/([^/]+)/([^/\"]+)$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Run the whole corpus once; return (results by case, forbidden opens by case, inet sockets, the cases
    the trace saw)."""
    root = tmp_path_factory.mktemp("corpus")
    results_path, trace_path = root / "results.json", root / "trace.txt"
    command = [sys.executable, str(RUNNER), str(root / "cases"), str(results_path)]
    if STRACE:
        command = [STRACE, "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat,openat2,creat,socket,connect",
                   "-o", str(trace_path), *command]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    by_case = defaultdict(list)
    for result in json.loads(results_path.read_text()):
        by_case[result["case"]].append(result)
    forbidden, sockets, traced = defaultdict(list), [], set()
    if STRACE:
        current = "(start-up)"
        for line in trace_path.read_text(errors="replace").splitlines():
            opened = OPEN_CALL.match(line)
            if opened and (mark := MARK.search(opened.group(1))):
                case, step = mark.groups()
                current = None if step in ("prepare", "check") else case  # the runner's own files
                traced.add(case)
            elif current and opened and FORBIDDEN.search(opened.group(1)) and "site-packages" not in opened.group(1):
                forbidden[current].append(line)
            elif INET_SOCKET.match(line):
                sockets.append(line)
    return by_case, forbidden, sockets, traced


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_model_gives_one_error_line_or_a_correct_result(corpus, case):
    by_case, _, _, _ = corpus
    results = by_case[case.name]
    assert [r["command"] for r in results] == list(case.commands)
    assert {r["command"]: r["problems"] for r in results} == {command: [] for command in case.commands}


@pytest.mark.skipif(STRACE is None, reason="needs strace to trace the file opens")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_model_opens_nothing_outside_its_folder(corpus, case):
    _, forbidden, _, traced = corpus
    assert case.name in traced  # the trace saw this case's commands
    assert forbidden.get(case.name, []) == []


@pytest.mark.skipif(STRACE is None, reason="needs strace to trace sockets")
def test_no_command_opens_a_network_socket(corpus):
    _, forbidden, sockets, _ = corpus
    assert sockets == []
    assert forbidden.get("(start-up)", []) == []

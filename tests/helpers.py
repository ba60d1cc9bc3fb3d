"""Helpers shared by test modules: the counterfactual edit requests several tests use, scoring an applied edit, and
starting / stopping the Streamlit app in a subprocess."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

from editors.requests import EditRequest, make_request

#: a fact the default model knows (greedy: " Paris"), the locality probe of the Eiffel Tower edit
PARIS = "The capital of France is"


def eiffel_request(source: str, record: int = 0, *, target_new: str = "Rome", probes: bool = False) -> EditRequest:
    """The Eiffel Tower (located in Paris) rewritten to ``target_new``. ``probes``: with a rephrase and
    :data:`PARIS` as its locality probe (answer "Paris"), relation ``located_in``."""
    extra = dict(rephrase_prompts=["Where is the Eiffel Tower? It is in the city of"], locality_prompts=[PARIS],
                 locality_answers=["Paris"], relation="located_in") if probes else {}
    return make_request(source=source, record=record, case_id="eiffel-rome" if probes else "eiffel",
                        prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                        target_new=target_new, target_true="Paris", **extra)


def darrieux_request(source: str, record: int = 1) -> EditRequest:
    """Danielle Darrieux's mother tongue (French) rewritten to English."""
    return make_request(source=source, record=record, case_id="darrieux",
                        prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                        target_new="English", target_true="French")


def score_applied(lm, result, request: EditRequest, reference, prompts: list[str]) -> tuple[dict, list[str]]:
    """Apply ``result``, then score ``request`` (its teacher-forced metrics ``{metric: value}``, against the
    unedited model's ``reference``) and greedily continue ``prompts`` by 4 tokens; the edit is undone after."""
    from analysis.evaluation import TF, evaluate_requests, greedy_continuations
    from editors.base import apply_result

    undo = apply_result(lm, result)
    try:
        rows = evaluate_requests(lm, [request], reference)
        after = {r["metric"]: r["value"] for r in rows if r["protocol"] == TF}
        continuations = greedy_continuations(lm, prompts, max_new_tokens=4)
    finally:
        undo(lm.model)
    return after, continuations


def free_port() -> int:
    """A TCP port of localhost that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll the Streamlit health endpoint of ``url`` until it answers "ok" (True), or ``proc`` exits or ``timeout``
    seconds pass (False)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return True
        except OSError:
            pass
        time.sleep(0.3)  # polling a server that is starting (no element to wait on yet)
    return False


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate ``proc``, and kill it when it has not exited after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()

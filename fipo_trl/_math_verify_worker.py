"""Worker process for fipo_trl.rewards.MathVerifier: answers "is pred equivalent to gold?" with math-verify.

Run as a script (``python -P _math_verify_worker.py <soft timeout s>``) so that it imports math-verify only,
not torch or TRL. Protocol: one JSON object per line on stdin ``{"gold": str, "pred": str}``, one JSON line on
stdout ``{"equal": bool, "error": str | null}``, after a first ``{"ready": true}`` line; ``{"parse": str}`` asks
whether math-verify finds a math expression in a text (not only its raw-text fallback): ``{"parsed": bool, "error":
str | null}``.
math-verify's own signal-based timeouts work here because they run in
this process's main thread; the parent adds a hard wall-clock limit and kills this process if it is exceeded (a
signal cannot interrupt a long C-level computation such as a huge integer power).
"""

from __future__ import annotations

import functools
import json
import logging
import sys


def boxed(text: str) -> str:
    """Present an answer to math-verify as a boxed LaTeX expression, its highest-priority extraction target."""
    text = text.strip().strip("$").strip()
    return text if "\\boxed" in text else "\\boxed{" + text + "}"


def main() -> None:
    soft_timeout = max(1, int(float(sys.argv[1]))) if len(sys.argv) > 1 else 1
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but protocol lines may reach the parent's pipe
    logging.disable(logging.CRITICAL)  # math-verify logs the whole input on a timeout: 1 MB lines otherwise

    from math_verify import parse, verify

    @functools.lru_cache(maxsize=4096)
    def parsed(text: str):
        return parse(boxed(text), parsing_timeout=soft_timeout)

    out.write(json.dumps({"ready": True}) + "\n")  # imports done: the parent starts its per-request clock now
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if "parse" in request:
                # an expression, not only the raw text math-verify falls back to when it finds none
                expression = any(not isinstance(item, str) for item in parsed(request["parse"]))
                out.write(json.dumps({"parsed": expression, "error": None}) + "\n")
                out.flush()
                continue
            gold, pred = parsed(request["gold"]), parsed(request["pred"])
            equal = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=soft_timeout))
            reply = {"equal": equal, "error": None}
        except BaseException as error:  # noqa: BLE001 - any failure is a "not equal" answer, never a crash
            reply = {"equal": False, "parsed": False, "error": type(error).__name__}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

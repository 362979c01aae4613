"""Peak memory of `gptkit prepare` on one huge document: as a .jsonl record vs a plain-text file.

    python benchmarks/prepare_memory.py --size-mb 100 [--kind words|nospace] [--tokenizer DIR] [--code DIR]

Writes the same text (words and punctuation drawn from argparse.py's source, seeded; with
--kind nospace all whitespace removed, so the tokenizer's pre-tokens are long) once as one
JSONL record and once as a .txt file under /tmp (deleted afterwards, never committed), runs `python -m gptkit prepare` on each in a child process
(--workers 1) and reports the child's peak RSS (ru_maxrss from wait4) and the wall time.
--code runs another checkout's gptkit (e.g. the code before a change) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def words() -> list[str]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    return re.findall(r"\w+|[^\w\s]", text)


def write_document(size: int, seed: int, write, nospace: bool = False) -> None:
    """size bytes of word salad in 1 MB pieces (never the whole text in memory)."""
    rng, vocab, done = random.Random(seed), words(), 0
    while done < size:
        piece = []
        for _ in range(20_000):
            line = " ".join(rng.choices(vocab, k=12))
            piece.append(line + ("\n" if rng.random() < 0.08 else " "))
        chunk = "".join(piece)
        chunk = (re.sub(r"\s+", "", chunk) if nospace else chunk)[: size - done]
        write(chunk)
        done += len(chunk.encode("utf-8"))


def make_inputs(folder: Path, size: int, nospace: bool) -> tuple[Path, Path]:
    txt, jsonl = folder / "doc.txt", folder / "doc.jsonl"
    with open(txt, "w", encoding="utf-8") as t, open(jsonl, "w", encoding="utf-8") as j:
        j.write('{"text": "')

        def both(chunk: str) -> None:
            t.write(chunk)
            j.write(json.dumps(chunk)[1:-1])  # the string's JSON escaping, without the quotes

        write_document(size, 1234, both, nospace)
        j.write('"}\n')
    return txt, jsonl


def run_prepare(code: Path, tokenizer: Path, source: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gptkit", "prepare", str(source), "--tokenizer", str(tokenizer), "--out", str(out),
           "--workers", "1"]
    t0 = time.perf_counter()
    # cwd outside any checkout: `python -m` puts the working folder first on sys.path
    proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    while True:  # VmHWM polled as well: the peak as /proc reports it, to cross-check ru_maxrss
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        hwm = max(hwm, _vm_hwm_kib(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    stderr = proc.stderr.read().decode()[-500:]
    ok = os.waitstatus_to_exitcode(status) == 0
    meta = json.loads((out / "meta.json").read_text()) if ok else {}
    tokens = sum(s["tokens"] for s in meta.get("splits", {}).values())
    return {"input": source.name, "ok": ok, "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "polled_vmhwm_mib": round(hwm / 1024),
            "seconds": round(seconds, 1), "tokens": tokens, **({} if ok else {"stderr": stderr})}


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=100)
    ap.add_argument("--tokenizer", type=Path, default=Path("/work/main/runs/demo/tokenizer"))
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose gptkit to run")
    ap.add_argument("--only", choices=["txt", "jsonl"], default=None)
    ap.add_argument("--kind", choices=["words", "nospace"], default="words")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptkit-prepmem-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        txt, jsonl = make_inputs(tmp, int(args.size_mb * 1e6), args.kind == "nospace")
        for source in (txt, jsonl):
            if args.only and source.suffix != f".{args.only}":
                continue
            result = run_prepare(args.code, args.tokenizer, source, tmp / f"out-{source.suffix[1:]}")
            print(json.dumps({"size_mb": args.size_mb, "kind": args.kind, "code": str(args.code), **result}), flush=True)
            shutil.rmtree(tmp / f"out-{source.suffix[1:]}", ignore_errors=True)


if __name__ == "__main__":
    main()

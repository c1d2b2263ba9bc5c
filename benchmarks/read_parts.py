"""Where the six-heads-a-key cache read's time goes on this CPU, part by part (scoring, softmax, values, rotating
rotary keys, the whole read), per key in units of one 8-float multiply-add at full rate: one thread, keys in the
CPU's caches, so it measures the kernel's arithmetic and not the machine's memory. Builds
`benchmarks/csrc/read_parts.cpp` against this tree's `kv_decode.cpp` with the kernel's own flags. The parts are
AVX2 builds' loops; elsewhere only the whole read is timed. Results in docs/PERFORMANCE.md.

    python benchmarks/read_parts.py --keys 512 --rounds 7
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from qkvlab.nn import kv_decode

SOURCE = Path(__file__).parent / "csrc" / "read_parts.cpp"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=512, help="keys of the whole read (a multiple of 32)")
    p.add_argument("--rounds", type=int, default=7, help="rounds per part (median)")
    args = p.parse_args()
    if args.keys < 32 or args.keys % 32:
        p.error(f"--keys must be a positive multiple of 32, got {args.keys}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main() -> None:
    args = parse_args()
    kernel = kv_decode.SOURCES[0]
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "read_parts"
        built = subprocess.run([kv_decode._compiler(), *kv_decode.flags(), f"-I{kernel.parent}",
                                f'-DKV_DECODE="{kernel}"', str(SOURCE), "-o", str(exe)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"read_parts.py: building {SOURCE.name} failed: {built.stderr.strip()[:300]}")
        subprocess.run([str(exe), str(args.keys), str(args.rounds)], check=True)


if __name__ == "__main__":
    main()

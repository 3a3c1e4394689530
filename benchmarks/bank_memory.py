"""Whole-process peak memory of the soft bank cross-entropy: materializing reference vs streaming (CPU, issue 2).

Each variant runs in its own subprocess, so the numbers are the peak RSS of a fresh process (``ru_maxrss`` of that
child) and nothing is inherited from earlier variants:

  setup      inputs only (student, teacher, the fp16 bank): the floor every variant shares
  reference  forward+backward with backend="reference" (N×K fp32 logits, softmaxes and their gradients)
  streaming  forward+backward with backend="streaming" (bank chunks of 8192 rows)

Usage: python benchmarks/bank_memory.py [--smoke]   (default shape N=256, K=262144, D=128)
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

STEM = "bank_memory"
VARIANTS = ("setup", "reference", "streaming")


def child(variant: str, n: int, k: int, d: int) -> None:
    """Build the inputs, run one forward+backward of ``variant``, print peak RSS before/after as JSON."""
    import torch
    import torch.nn.functional as F

    import fastssl.functional as FF

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(k, d, generator=gen), dim=1).half()
    student = torch.randn(n, d, generator=gen, requires_grad=True)
    teacher = torch.randn(n, d, generator=gen)
    setup_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = None
    if variant != "setup":
        loss = FF.soft_bank_cross_entropy(student, teacher, bank, 0.1, 0.04, backend=variant)
        loss.backward()
    print(json.dumps({"setup_kib": setup_kib, "loss": None if loss is None else loss.item()}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], *map(int, argv[2:5]))
        return 0
    parser = harness.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    n, k, d = (16, 4096, 32) if args.smoke else (256, 262144, 128)
    rows = []
    for variant in VARIANTS:
        peak_mb, out = harness.subprocess_peak_rss_mb(
            [sys.executable, __file__, "--child", variant, str(n), str(k), str(d)]
        )
        info = json.loads(out.strip().splitlines()[-1])
        rows.append(
            {
                "op": "soft_bank_cross_entropy",
                "mode": "forward+backward" if variant != "setup" else "inputs only",
                "N": n, "K": k, "D": d, "bank_dtype": "fp16", "provider": variant,
                "peak_rss_mb": peak_mb, "loss": info["loss"],
            }
        )  # fmt: skip
        print(harness.markdown_table([rows[-1]]).splitlines()[-1], flush=True)
    floor = rows[0]["peak_rss_mb"]
    for row in rows:
        row["extra_over_setup_mb"] = row["peak_rss_mb"] - floor
    ref = next(r for r in rows if r["provider"] == "reference")
    for row in rows[1:]:
        row["reduction_vs_reference"] = ref["extra_over_setup_mb"] / max(row["extra_over_setup_mb"], 1e-9)
    logits_mb = n * k * 4 / 2**20
    notes = (
        f"One fp32 N×K logit matrix is {logits_mb:.0f} MB. Peak RSS of a fresh process per variant (ru_maxrss); "
        "'extra' subtracts the inputs-only process. The loss values agree across variants. Part of streaming's extra "
        "is fixed: its first call goes through a torch.library custom op, whose dispatch imports several hundred "
        "modules (sympy among them); the --smoke shape (N=16, K=4096, D=32) shows that overhead alone."
    )
    env = harness.environment("cpu")
    out_dir = args.out_dir or (harness.SMOKE_DIR if args.smoke else harness.results_dir(env["device"]))
    paths = harness.write_results(STEM, rows, title="Soft bank CE peak memory (CPU RSS)", out_dir=out_dir, env=env,
                                  notes=notes)  # fmt: skip
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

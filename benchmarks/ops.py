"""Micro-benchmark of the knnclip._C CPU ops against the NumPy float64 reference and plain PyTorch.

Real sizes: DINOv2 keys 1536x37x37, CLIP dense features 1536x25x34 (800x1088 input, stride 32),
250 FC-CLIP mask logits at stride 4 (200x272), 10 neighbours, 150 (A-150) and 847 (A-847)
classes; the post-processing ops at FC-CLIP's mask resize to a 512x683 image (resample) and 100
kept queries (panoptic_owner). The PyTorch versions are what a PyTorch user writes (resample: the
two dense products the engine used before). Every implementation runs in this one process on the
same inputs; the median of the repeats is reported with its spread.

    python benchmarks/ops.py            # full: writes benchmarks/results/ops.{json,md,png}
    python benchmarks/ops.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from common import RESULTS, machine, pyplot, timeit_interleaved, write_json, write_text

from knnclip import _C
from knnclip.engine.bench import reference_ops as ref

MASK_HW = (200, 272)  # FC-CLIP mask logits of an 800x1088 input (stride 4)


def torch_ops() -> dict[str, Callable[..., Any]] | None:
    """The same ops as a PyTorch user would write them (FC-CLIP's own formulation)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    def mask_pool(features, masks):
        c, h, w = features.shape
        m = F.interpolate(masks[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        m = (m > 0).to(features.dtype)
        counts = m.sum(dim=(1, 2))
        return torch.einsum("chw,nhw->nc", features, m) / counts.clamp(min=1)[:, None]

    def retrieval_probs(sims, labels, num_classes, tau):
        real = labels >= 0
        weights = torch.softmax(torch.where(real, sims / tau, float("-inf")), dim=1).nan_to_num(0.0)
        out = torch.zeros(sims.shape[0], num_classes)
        return out.scatter_add_(1, labels.clamp(min=0), weights * real)

    def fuse(p_base, p_ret, T, lam):
        confident = p_ret.amax(dim=1, keepdim=True) >= T
        return torch.where(confident, lam * p_ret + (1 - lam) * p_base, p_base)

    def semantic_merge(probs, logits):
        return torch.einsum("nc,nhw->chw", probs, logits.sigmoid())

    def semantic_argmax(probs, logits):
        return torch.einsum("nc,nhw->chw", probs, logits.sigmoid()).argmax(0)

    def resample(x, rows, cols):
        return torch.matmul(torch.matmul(rows, x), cols.T)

    def panoptic_owner(scores, logits, queries):
        kept = logits[queries]
        owner = (scores[:, None, None] * kept.sigmoid()).argmax(0)
        own = kept.gather(0, owner[None])[0] >= 0
        return owner, own, (kept >= 0).flatten(1).sum(1)

    return {
        "mask_pool": mask_pool,
        "retrieval_probs": retrieval_probs,
        "fuse": fuse,
        "semantic_merge": semantic_merge,
        "semantic_argmax": semantic_argmax,
        "resample": resample,
        "panoptic_owner": panoptic_owner,
        "from_numpy": torch.from_numpy,
        "no_grad": torch.inference_mode,
    }


def cases(rng: np.random.Generator) -> list[dict[str, Any]]:
    masks = (rng.standard_normal((250, *MASK_HW)) * 4).astype(np.float32)
    out = []
    for name, shape in [("DINOv2 keys 1536x37x37", (1536, 37, 37)), ("CLIP dense 1536x25x34", (1536, 25, 34))]:
        features = rng.standard_normal(shape).astype(np.float32)
        for dtype in (np.float32, np.float16):
            out.append(
                {
                    "op": "mask_pool",
                    "size": f"{name}, 250 masks {MASK_HW[0]}x{MASK_HW[1]}",
                    "dtype": np.dtype(dtype).name,
                    "args": (features.astype(dtype), masks.astype(dtype)),
                }
            )
    for classes in (150, 847):
        sims = rng.uniform(0.2, 0.9, (250, 10)).astype(np.float32)
        labels = rng.integers(0, classes, (250, 10)).astype(np.int64)
        out.append(
            {
                "op": "retrieval_probs",
                "size": f"250x10 neighbours, {classes} classes",
                "dtype": "float32",
                "args": (sims, labels, classes, 0.07),
            }
        )
        p_base = rng.dirichlet(np.ones(classes), 250).astype(np.float32)
        p_ret = rng.dirichlet(np.ones(classes) * 0.05, 250).astype(np.float32)
        out.append({"op": "fuse", "size": f"250x{classes}", "dtype": "float32", "args": (p_base, p_ret, 0.5, 0.6)})
        for dtype in (np.float32, np.float16):
            out.append(
                {
                    "op": "semantic_merge",
                    "size": f"250x{classes} probs, 250 masks {MASK_HW[0]}x{MASK_HW[1]}",
                    "dtype": np.dtype(dtype).name,
                    "args": (p_base.astype(dtype), masks.astype(dtype)),
                }
            )
        out.append(
            {
                "op": "semantic_argmax",
                "size": f"250x{classes} probs, 250 masks {MASK_HW[0]}x{MASK_HW[1]}",
                "dtype": "float32",
                "args": (p_base, masks),
            }
        )
    from knnclip.engine.pipeline.postprocess import resize_matrices

    small = (rng.standard_normal((250, 160, 216)) * 4).astype(np.float32)
    rows, cols = resize_matrices((160, 216), (640, 864), (640, 853), (512, 683))
    out.append(
        {
            "op": "resample",
            "size": "250 masks 160x216 -> 512x683 (FC-CLIP's upsample, crop, resize)",
            "dtype": "float32",
            "args": (small, rows, cols),
        }
    )
    queries = np.sort(rng.choice(250, 100, replace=False)).astype(np.int64)
    scores = rng.uniform(0.3, 1.0, 100).astype(np.float32)
    out.append(
        {
            "op": "panoptic_owner",
            "size": f"100 of 250 masks {MASK_HW[0]}x{MASK_HW[1]}",
            "dtype": "float32",
            "args": (scores, masks, queries),
        }
    )
    return out


def run(repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    torch_impl = torch_ops()
    rows = []
    for case in cases(rng):
        op, args = case["op"], case["args"]
        ref_args = tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)
        fns = {
            "knnclip": lambda op=op, args=args: getattr(_C, op)(*args),
            "numpy_reference": lambda op=op, ref_args=ref_args: getattr(ref, op)(*ref_args),
        }
        counts = {"knnclip": repeats, "numpy_reference": max(3, repeats // 2)}
        if torch_impl is not None and case["dtype"] == "float32":
            t_args = tuple(torch_impl["from_numpy"](a) if isinstance(a, np.ndarray) else a for a in args)

            def torch_call(t_args=t_args, op=op):
                with torch_impl["no_grad"]():
                    return torch_impl[op](*t_args)

            fns["torch"] = torch_call
            counts["torch"] = repeats
        timings = timeit_interleaved(fns, counts, warmup=2)
        ours = timings["knnclip"]
        row = {k: case[k] for k in ("op", "size", "dtype")}
        row.update(timings)
        row["speedup_vs_numpy"] = timings["numpy_reference"]["median_s"] / ours["median_s"]
        if "torch" in timings:
            row["speedup_vs_torch"] = timings["torch"]["median_s"] / ours["median_s"]
        rows.append(row)
        print(
            f"{op:<16} {case['dtype']:<8} {case['size']:<52} knnclip {ours['median_s'] * 1e3:9.3f} ms   "
            f"numpy x{row['speedup_vs_numpy']:7.1f}   torch x{row.get('speedup_vs_torch', float('nan')):6.1f}",
            flush=True,
        )
    return {"benchmark": "ops", "machine": machine(), "cpu_isa": _C.cpu_isa(), "repeats": repeats, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# knnclip._C CPU ops vs NumPy float64 reference and PyTorch",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; kernels: {result['cpu_isa']}; "
        f"numpy {m['versions']['numpy']}, torch {m['versions']['torch']}.",
        f"Median of {result['repeats']} runs after warm-up (NumPy reference: half as many), all in one "
        "process, the implementations timed in alternating blocks; p25-p75 in brackets. "
        "Produced by `python benchmarks/ops.py`.",
        "",
        "| op | size | dtype | knnclip ms | NumPy ref ms | x NumPy | torch ms | x torch |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(t: dict[str, float]) -> str:
        return f"{t['median_s'] * 1e3:.3f} [{t['p25_s'] * 1e3:.3f}-{t['p75_s'] * 1e3:.3f}]"

    for r in result["rows"]:
        torch_ms = ms(r["torch"]) if "torch" in r else "-"
        x_torch = f"{r['speedup_vs_torch']:.1f}" if "torch" in r else "-"
        lines.append(
            f"| {r['op']} | {r['size']} | {r['dtype']} | {ms(r['knnclip'])} | {ms(r['numpy_reference'])} | "
            f"{r['speedup_vs_numpy']:.1f} | {torch_ms} | {x_torch} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    labels = [f"{r['op']}\n{r['size'].split(',')[0]} {r['dtype']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 5))
    series = [(-0.27, "knnclip", "knnclip._C"), (0.0, "torch", "PyTorch"), (0.27, "numpy_reference", "NumPy f64 ref")]
    for offset, key, name in series:
        vals = [r[key]["median_s"] * 1e3 if key in r else np.nan for r in rows]
        ax.bar(x + offset, vals, width=0.27, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.legend()
    ax.set_title(f"CPU ops, {result['machine']['cpu']}, {result['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 15")
    parser.add_argument("--name", default="ops", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    result = run(3 if args.quick else 15)
    write_json(args.name, result)
    write_text(f"{args.name}.md", markdown(result))
    plot(result, str(RESULTS / f"{args.name}.png"))
    print(f"wrote {RESULTS / args.name}.{{json,md,png}}")


if __name__ == "__main__":
    main()

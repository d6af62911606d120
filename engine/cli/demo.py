"""``knnclip demo``: the whole engine on synthetic data, on a CPU, with no downloads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from knnclip.engine.demo.run import DemoSettings, run_demo

    def config(value: str | None):
        if value is None:
            return None
        path = Path(value)
        return json.loads(path.read_text() if path.is_file() else value)

    settings = DemoSettings(
        out=Path(args.out),
        train=args.train,
        val=args.val,
        seed=args.seed,
        fcclip=args.fcclip,
        fcclip_config=config(args.fcclip_config),
        dinov2=args.dinov2,
        dinov2_config=config(args.dinov2_config),
        sampling=args.sampling,
        backend=args.backend,
        search=args.search,
    )
    report = run_demo(settings, say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="the whole engine on synthetic data, CPU, no downloads (random weights unless given)"
    )
    demo.add_argument("--out", default="knnclip-demo", help="working directory (default ./knnclip-demo)")
    demo.add_argument("--train", type=int, default=48, help="training images (default 48)")
    demo.add_argument("--val", type=int, default=16, help="validation images (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fcclip", help="a real FC-CLIP checkpoint instead of seeded weights")
    demo.add_argument("--fcclip-config", help="its config (JSON or file); default ConvNeXt-L")
    demo.add_argument("--dinov2", help="a real DINOv2 checkpoint instead of seeded weights")
    demo.add_argument("--dinov2-config", help="its config (JSON, file or preset); default ViT-g/14-reg4")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    from knnclip.engine.backends import BACKENDS
    from knnclip.engine.cli.common import search_option

    demo.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="the models' backend")
    search_option(demo)
    demo.add_argument(
        "--sampling",
        default="gather",
        choices=["gather", "grid"],
        help="FC-CLIP's deformable-attention export (grid: what OpenVINO's bf16 needs, --backend openvino-bf16)",
    )
    demo.set_defaults(run=_demo)

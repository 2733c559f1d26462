"""How often the pocket model does the right thing, through the served path, judged by a program.

Starts tritonserver on a pocket checkpoint (default: the committed one, ``gill/data/pocket``), or talks to a
running server (``--url``), and prints each rate of :mod:`gill.pocket.quality` beside its chance level, and the
judge's own accuracy on clean and degraded renders (its error bar).

    python bench/pocket_quality.py                       # the committed checkpoint, about 2 minutes on 2 cores
    python bench/pocket_quality.py --checkpoint /tmp/pocket --captions 96
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gill.pocket.judge import judge_accuracy
from gill.pocket.quality import QualityProbe, caption_prompts, heldout_prompts, retrieval_prompts
from gill.pocket.world import World


def measure(client, world: World, captions: int) -> list:
    probe = QualityProbe(client, world)
    return [
        probe.show_me(heldout_prompts(world)),
        probe.show_me(retrieval_prompts(world)[:24]),
        probe.retrieve(retrieval_prompts(world)),
        probe.caption(caption_prompts(world, captions)),
        probe.generate(heldout_prompts(world, verb="draw")),
        probe.generate(retrieval_prompts(world)[:24]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="pocket checkpoint (default: the committed one)")
    parser.add_argument("--url", help="a running server's gRPC address instead of starting one")
    parser.add_argument("--captions", type=int, default=48, help="images to caption")
    parser.add_argument("--json", type=Path, help="also write the rates here")
    args = parser.parse_args()

    from gill.pocket.default import pocket_checkpoint
    from gill.serving.server import TritonServer
    from gill_client import GillClient

    checkpoint = args.checkpoint or pocket_checkpoint()
    seed = json.loads((checkpoint / "pocket.json").read_text())["seed"] if not args.url else 0
    world = World(seed)
    start = time.perf_counter()
    if args.url:
        with GillClient(args.url) as client:
            rates = measure(client, world, args.captions)
    else:
        with TritonServer(checkpoint) as server, GillClient(server.endpoints.grpc) as client:
            rates = measure(client, world, args.captions)
    print(f"pocket model {checkpoint}, served ({time.perf_counter() - start:.0f} s); chance: colour 1/8 = 12.5%, "
          f"colour and shape 1/24 = 4.2%")
    for rate in rates:
        print(f"  {rate}")
    for strength in (0.0, 1.0):
        accuracy = judge_accuracy(world, samples=240, strength=strength)
        print(f"  judge on renders degraded {strength}: colour {accuracy.colour:.1%}, background "
              f"{accuracy.background:.1%}, shape {accuracy.shape:.1%} ({accuracy.samples} images)")
    if args.json:
        args.json.write_text(json.dumps([rate.__dict__ for rate in rates], indent=1, default=list))


if __name__ == "__main__":
    main()

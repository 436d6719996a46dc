"""Where an evaluation's probes fall relative to GRACE's deferral radius (issue #5): for each
of the first ``--limit`` dev records of ``--dataset``, the distance from the edit's key (the
block output at the edit prompt's last token, at GRACE's default block) to the probe's block
outputs, as a fraction of the key's norm, the unit of ``GraceHparams.radius``.

* locality: the nearest of every position of ``probe prompt + " " + answer`` (a position
  inside the radius has its output replaced, so the probe's answer can move);
* Subject_Aliasing portability and rephrasings: the probe prompt's last token (inside the
  radius, the edit's value answers it).

For each kind it prints the share of probes inside radii 0.05-0.2 (0.2 is the default).

    OMP_NUM_THREADS=1 python benchmarks/grace_radius_probes.py [--dataset WikiData_counterfact]
        [--limit 200]
"""

from __future__ import annotations

import argparse
import time

RADII = (0.05, 0.08, 0.1, 0.12, 0.15, 0.2)


def main() -> None:
    import torch

    from memedit.adapters.grace import GraceHparams
    from memedit.datasets import load_requests
    from memedit.intrinsic.compute import block_name, capture, encode
    from memedit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="WikiData_counterfact")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()

    model, tok = load_model()
    layer = GraceHparams().layer_for(model)
    module = block_name(model, layer)

    def outputs(text: str) -> torch.Tensor:
        ids = torch.tensor([encode(tok, text)])
        _, out = capture(model, module, ids, torch.ones_like(ids))
        return out[0].float()

    t0 = time.perf_counter()
    ratios: dict[str, list[float]] = {"locality": [], "Subject_Aliasing": [], "rephrase": []}
    for r in load_requests(args.dataset, limit=args.limit):
        key = outputs(r.prompt)[-1]
        norm = float(key.norm())
        for p in r.locality:
            if p.answers:
                near = (outputs(f"{p.prompt} {p.answers[0]}") - key).norm(dim=-1).min()
                ratios["locality"].append(float(near) / norm)
        for p in r.portability:
            if p.kind == "Subject_Aliasing" and p.answers:
                far = (outputs(p.prompt)[-1] - key).norm()
                ratios["Subject_Aliasing"].append(float(far) / norm)
        for text in r.rephrase:
            ratios["rephrase"].append(float((outputs(text)[-1] - key).norm()) / norm)
    took = time.perf_counter() - t0
    print(f"{args.dataset} dev 0-{args.limit - 1}, block {layer} ({took:.0f} s)")
    for kind, values in ratios.items():
        if not values:
            continue
        share = ", ".join(
            f"{radius}: {sum(v < radius for v in values) / len(values):.3f}" for radius in RADII
        )
        print(f"  {kind}: {len(values)} probes; share inside radius {share}")


if __name__ == "__main__":
    main()

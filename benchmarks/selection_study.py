"""Study: does a reconstruction-aware choice of channels beat FLAP's, once the ``ls`` refit follows?

FLAP keeps each layer's channels by fluctuation (``WIFV``: variance x squared weight column), the
loss of removing one channel with *mean* compensation. With a least-squares refit, the loss of
removing channel j is instead its *conditional* variance given the kept channels, the optimal brain
surgeon criterion ``||W[:, j]||^2 / [H^-1]_jj`` (H = Sigma + lambda I, the refit's own ridge), and
removals interact. This study keeps FLAP's per-layer widths (its allocation) and replaces only the
choice inside each layer by greedy backward elimination under that criterion (one channel at a time
for the MLP, one KV group at a time for attention, H^-1 and W updated after each removal, as
SlimGPT / ZipLM do), then refits with ``ls`` and compares perplexity on both domains against FLAP's
own channels with the same refit, and against FLAP-bias.

    python benchmarks/selection_study.py [--ratio 0.2] [--ridge 0.03] [--max-tokens 8192]

Calibration as ``quality.py`` (128 WikiText-2 valid windows x 128 tokens, seed 0); evaluation the
first --max-tokens tokens of each domain in windows of 512. Results: benchmarks/results/selection.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

from flap_deploy import PruneConfig, prune  # noqa: E402
from flap_deploy.model.adapters import get_adapter  # noqa: E402
from flap_deploy.pruning.calibration import calibration_windows  # noqa: E402
from flap_deploy.model.layout import LayerMask  # noqa: E402
from flap_deploy.pruning.compress import compress  # noqa: E402
from flap_deploy.io.model_ref import load_model, load_tokenizer  # noqa: E402
from flap_deploy.pruning.pipeline import collect_statistics  # noqa: E402
from flap_deploy.pruning.reconstruct import refit_layers  # noqa: E402


def eliminate(w: torch.Tensor, sigma: torch.Tensor, unit: int, n_remove: int, ridge: float) -> torch.Tensor:
    """Keep-mask over the ``unit``-column blocks of ``w`` after greedily removing ``n_remove`` of them, each
    the block whose removal (with the optimal update of the others) costs least."""
    n = sigma.shape[0]
    h_inv = torch.linalg.inv(sigma + ridge * float(sigma.diagonal().mean()) * torch.eye(n, dtype=torch.float64))
    w = w.clone()
    blocks = torch.arange(n).view(-1, unit)
    alive = torch.ones(len(blocks), dtype=torch.bool)
    for _ in range(n_remove):
        if unit == 1:
            loss = w.square().sum(0) / h_inv.diagonal()
        else:
            loss = torch.stack([torch.trace(w[:, b] @ torch.linalg.solve(h_inv[b][:, b], w[:, b].T)) for b in blocks])
        loss[~alive] = float("inf")
        k = int(loss.argmin())
        b = blocks[k]
        g_inv = torch.linalg.inv(h_inv[b][:, b])
        w -= w[:, b] @ g_inv @ h_inv[b, :]
        h_inv -= h_inv[:, b] @ g_inv @ h_inv[b, :]
        w[:, b] = 0
        alive[k] = False
    return alive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2, help="Removed fraction (default 0.2).")
    ap.add_argument("--ridge", type=float, default=PruneConfig().ridge,
                    help="Ridge of the refit and of the elimination's H (default: the library's).")
    ap.add_argument("--max-tokens", type=int, default=8192, help="Evaluation tokens per domain (default 8,192).")
    ap.add_argument("--out", type=Path, default=Q.REPO / "benchmarks" / "results" / "selection.json",
                    help="Result file (default benchmarks/results/selection.json).")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    dense, tok = load_model("smollm2-135m", dtype=torch.float32), load_tokenizer("smollm2-135m")
    valid = str(Q.WIKITEXT / "valid.txt")
    calib = calibration_windows(valid, dense, tok, 128, 128, 0, progress=False)
    stats = collect_statistics(dense, PruneConfig(seqlen=128, progress=False), tok, covariance=True,
                               windows=calib.input_ids, calibration=calib.describe(0))
    cfg = dict(ratio=args.ratio, calib=valid, nsamples=128, seqlen=128, progress=False)
    bias = prune(dense, PruneConfig(**cfg, reconstruct="bias"), tok, statistics=stats)
    ls = prune(dense, PruneConfig(**cfg, ridge=args.ridge), tok, statistics=stats)
    adapter = get_adapter(dense.config)
    geom = adapter.geometry(dense.config)
    group = geom.num_heads // geom.num_kv_heads
    t = time.perf_counter()
    masks = []
    for i, (flap, s) in enumerate(zip(bias.masks, stats.layers)):
        m = adapter.layer_modules(dense, i)
        heads, mlp = flap.heads, flap.mlp
        if heads is not None and not bool(heads.all()):
            n = int((~heads.bool()).sum()) // group
            heads = eliminate(m.o_proj.weight.double(), s.attn_cov.covariance(), group * geom.head_dim, n,
                              args.ridge).repeat_interleave(group)
        if mlp is not None and not bool(mlp.all()):
            mlp = eliminate(m.down_proj.weight.double(), s.mlp_cov.covariance(), 1, int((~mlp.bool()).sum()),
                            args.ridge)
        masks.append(LayerMask(heads=heads, mlp=mlp))
    selection_s = time.perf_counter() - t
    obs = compress(dense, masks, refits=refit_layers(dense, calib.input_ids, masks, args.ridge,
                                                     covariances=stats.covariances, progress=False))
    rows = {k: {} for k in ("dense", "FLAP-bias", "FLAP channels + ls", "OBS channels + ls")}
    Q.evaluate_group(dense, dict(zip(rows, (dense, bias.model, ls.model, obs))), rows,
                     Q.eval_texts(tok, types.SimpleNamespace(eval_seqlen=512, max_tokens=args.max_tokens)), lambda: None)
    swapped = sum(int((a.mlp.bool() != b.mlp.bool()).sum()) // 2 for a, b in zip(masks, bias.masks))
    result = {"ratio": args.ratio, "ridge": args.ridge, "max_tokens": args.max_tokens, "selection_s": selection_s,
              "mlp_channels_swapped": swapped,
              "mlp_channels_removed": sum(int((~m.mlp.bool()).sum()) for m in bias.masks),
              "layers_with_other_heads": sum(int((a.heads.bool() != b.heads.bool()).any())
                                             for a, b in zip(masks, bias.masks)),
              "perplexity": {k: {d: v[d]["perplexity"] for d in Q.DOMAINS} for k, v in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

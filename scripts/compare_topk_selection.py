"""Does approximate top-k select what exact top-k selects, on real gradients?

Trains the `wide` model in one process the way a worker does (error feedback, momentum
correction, `approx-topk`), and at every selection also computes the exact top-k of the
same tensor: it prints how often they differ and whether each difference is a tie at the
k-th magnitude. Usage: .venv/bin/python scripts/compare_topk_selection.py [--steps 600]
"""

from __future__ import annotations

import argparse

import torch

from gradhub.codecs import ApproxTopK, codec_from_name, exact_topk
from gradhub.data import load_dataset
from gradhub.models import build_model
from gradhub_worker.error_feedback import ErrorFeedback, FeedbackOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--ratio", type=float, default=0.001)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    counts = {"selections": 0, "different": 0, "different_by_a_tie": 0}
    approximate = ApproxTopK.select

    def compared(self: ApproxTopK, flat: torch.Tensor, k: int) -> torch.Tensor:
        chosen = approximate(self, flat, k)
        if flat.numel() >= ApproxTopK.EXACT_BELOW:  # smaller tensors use the exact selection
            counts["selections"] += 1
            exact = exact_topk(flat, k)
            if not torch.equal(chosen, exact):
                counts["different"] += 1
                magnitudes = flat.abs()
                if torch.equal(magnitudes[chosen].sort().values, magnitudes[exact].sort().values):
                    counts["different_by_a_tie"] += 1
        return chosen

    ApproxTopK.select = compared  # type: ignore[method-assign]
    torch.manual_seed(0)
    data = load_dataset()
    model = build_model("wide")
    feedback = ErrorFeedback(codec_from_name(f"approx-topk:{args.ratio}", seed=1, dense_below=4096),
                             FeedbackOptions(momentum=0.9, weight_decay=5e-4, masking=False))
    batches = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        batch = torch.randint(len(data.x_train), (50,), generator=batches)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        parameters = list(model.parameters())
        sent = feedback.encode([(n, p.grad) for n, p in model.named_parameters()], parameters, step)
        with torch.no_grad():
            for parameter, tensor in zip(parameters, sent):
                parameter.sub_(args.lr * tensor.to_dense().view_as(parameter))
    print(counts)


if __name__ == "__main__":
    main()

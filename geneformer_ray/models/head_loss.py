"""The masked-gene loss of the prediction head's last layer, fused: logits, cross-entropy and their
gradients in one pass over chunks of the masked rows.

    loss = linear_cross_entropy(hidden, decoder.weight, decoder.bias, labels)  # == cross_entropy(decoder(hidden), labels)

The decoder maps each masked position to the whole vocabulary (25k genes). On a CPU the plain path,
``cross_entropy(linear(h))``, spends most of a small model's step moving that (masked, vocab) logits
block through memory a dozen times (written, copied, log-softmaxed, zero-filled for the gradient,
read back twice): with ``tiny`` 75% of the step. Here each chunk of rows is small enough to stay in
cache while its log-probabilities turn into the gradient in place, and the gradients for the hidden
states, weight and bias are formed in the forward pass, so backward only scales them. Same loss and
gradients as the plain path to float rounding (tests: 1e-5). Used on CPUs without autocast;
accelerators keep the plain path, where the block is cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``; hidden (rows, width),
    weight (vocab, width), labels (rows,) of class ids (no ignored rows)."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if not hidden.shape[0]:
        return F.cross_entropy(F.linear(hidden, weight, bias), labels)  # nan, as the plain path
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or bias.requires_grad)):
        return _loss_only(hidden, weight, bias, labels)
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels)


def chunk_rows(width: int) -> int:
    """Rows per chunk: the weight's gradient is read and written once per chunk, the chunk's logits
    should stay in cache; measured best on a 2-core CPU at 32 rows for width 64, >= 128 for 256,
    all rows for 768 (vocab 25k)."""
    return 32 * max(1, width // 64)


def _chunks(hidden, weight, bias, labels):
    """(rows, their hidden states, their labels, their log-probabilities (chunk, vocab)) chunk by chunk."""
    step = chunk_rows(hidden.shape[1])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        yield rows, hidden[rows], labels[rows], torch.log_softmax(torch.addmm(bias, hidden[rows], weight.t()), -1)


def _loss_only(hidden, weight, bias, labels) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for _, _, y, logp in _chunks(hidden, weight, bias, labels):
        total -= logp.gather(1, y[:, None]).sum()
    return total / hidden.shape[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward returns the summed loss / rows and keeps the (unscaled) gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        rows = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        total = hidden.new_zeros((), dtype=torch.float32)
        for chunk, h, y, logp in _chunks(hidden, weight, bias, labels):
            picked = torch.arange(y.shape[0], device=y.device)
            total -= logp[picked, y].sum()
            grad = logp.exp_()  # softmax - one-hot: d(loss * rows) / d(logits), in place
            grad[picked, y] -= 1
            torch.mm(grad, weight, out=grad_hidden[chunk])
            grad_weight.addmm_(grad.t(), h)
            grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total / rows

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output / grad_hidden.shape[0]
        return grad_hidden * scale, grad_weight * scale, grad_bias * scale, None

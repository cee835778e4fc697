"""Prototype (2026-12-04), not yet a prune option: after the default width prune, refit every pruned MLP (gate, up,
down) alone by Adam towards the teacher's MLP output on the teacher's own MLP inputs (cached, so no full forward
runs per step).

    .venv/bin/python benchmarks/mlp_local_refit.py runs/teacher runs/pmix runs/plocal 64 200 1e-3

TEACHER STUDENT OUT BLOCKS STEPS LR: BLOCKS × 512 calibration tokens of half books, half the teacher's samples (the
samples file the default prune's calibration made, 32 × 512 tokens, cached), STEPS Adam steps of 1,024 tokens per
layer. Prints each layer's relative output error before/after; then score OUT with benchmarks/ppl_probe.py.
"""

import sys
import time

import torch

import minigiant
from minigiant.data.samples import resolve_samples
from minigiant.data.text import sample_blocks
from minigiant.models.architecture import decoder_layers


@torch.no_grad()
def mlp_inputs_and_outputs(model, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every decoder layer's MLP input and output over ``blocks``, as [tokens, hidden] rows."""
    layers, width = decoder_layers(model), model.config.hidden_size
    seen = [([], []) for _ in layers]

    def hook(module, args, output, i):
        seen[i][0].append(args[0].reshape(-1, width))
        seen[i][1].append(output.reshape(-1, width))

    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, layer in enumerate(layers)]
    try:
        for batch in blocks.split(4):
            model(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [(torch.cat(x), torch.cat(y)) for x, y in seen]


def main() -> None:
    teacher_dir, student_dir, out = sys.argv[1:4]
    num_blocks, steps, lr = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    torch.manual_seed(0)
    teacher, tokenizer = minigiant.load(teacher_dir)
    student, _ = minigiant.load(student_dir)
    teacher.eval(), student.eval()
    text = resolve_samples("corpus:train+samples", teacher, tokenizer, 32 * 512)  # the default prune's cached samples
    start = time.time()
    cached = mlp_inputs_and_outputs(teacher, sample_blocks(tokenizer, text, 512, num_blocks, seed=1))
    print(f"captured in {time.time() - start:.0f}s", flush=True)
    for i, (layer, (x, y)) in enumerate(zip(decoder_layers(student), cached)):
        mlp = layer.mlp
        reference = y.pow(2).sum(1).mean()

        def relative_error(rows=slice(None)) -> torch.Tensor:
            return (mlp(x[rows]) - y[rows]).pow(2).sum(1).mean() / reference

        optimizer = torch.optim.Adam([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight], lr=lr)
        with torch.no_grad():
            before = relative_error().item()
        for _ in range(steps):
            loss = relative_error(torch.randint(0, len(x), (1024,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = relative_error().item()
        print(i, round(before, 4), round(after, 4), f"{time.time() - start:.0f}s", flush=True)
    student.requires_grad_(False)
    minigiant.save(student, tokenizer, out, overwrite=True)


if __name__ == "__main__":
    main()

"""Prototype (2026-12-04): after the default width prune (runs/pmix), refit every pruned MLP (gate/up/down) by Adam towards the
teacher's MLP output on cached teacher inputs. Usage: .venv/bin/python benchmarks/mlp_local_refit.py OUT BLOCKS STEPS LR
(measured: runs/plocal 64 200 1e-3). Needs runs/teacher and runs/pmix (see BENCHMARKS.md), and the cached teacher samples."""
import sys, time, torch
import minigiant
from minigiant.data.text import sample_blocks
torch.manual_seed(0)
out, nblocks, steps, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
stream = sys.argv[5] if len(sys.argv) > 5 else "teacher"
teacher, tok = minigiant.load("runs/teacher"); teacher.eval()
student, _ = minigiant.load("runs/pmix"); student.eval()
spec = "corpus:train+" + __import__("glob").glob(str(__import__("pathlib").Path.home() / ".cache/minigiant/samples/*-2.txt"))[0]
blocks = sample_blocks(tok, spec, 512, nblocks, seed=1)
def capture(model):
    xs = {i: [] for i in range(30)}; ys = {i: [] for i in range(30)}
    hs = [l.mlp.register_forward_hook(lambda m, a, o, i=i: (xs[i].append(a[0].detach().reshape(-1, 576)), ys[i].append(o.detach().reshape(-1, 576)), None)[-1]) for i, l in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in blocks.split(4):
            model(b, use_cache=False)
    for h in hs: h.remove()
    return {i: torch.cat(xs[i]) for i in xs}, {i: torch.cat(ys[i]) for i in ys}
t0 = time.time()
X, Y = capture(teacher)
print("captured", time.time() - t0, flush=True)
for i, layer in enumerate(student.model.layers):
    mlp = layer.mlp
    x, y = X[i], Y[i]
    ref = y.pow(2).sum(1).mean()
    params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad(): before = ((mlp(x) - y).pow(2).sum(1).mean() / ref).item()
    for s in range(steps):
        idx = torch.randint(0, len(x), (1024,))
        loss = (mlp(x[idx]) - y[idx]).pow(2).sum(1).mean() / ref
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): after = ((mlp(x) - y).pow(2).sum(1).mean() / ref).item()
    print(i, round(before, 4), round(after, 4), f"{time.time()-t0:.0f}s", flush=True)
for p in student.parameters(): p.requires_grad_(False)
minigiant.save(student, tok, out, overwrite=True)

"""Drop a MoALinear in place of a frozen nn.Linear, train it briefly, and check it against the
reference backend. Run: python examples/quickstart.py"""

import torch
from torch import nn

from moa import MoALinear, RouterConfig


def main() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = MoALinear(base, ["lora:8", "lora:16", "adapter:16"], RouterConfig(), backend="torch")
    target = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=3e-3)
    for step in range(200):
        x = torch.randn(32, 64)
        loss = (layer(x) - target(x).detach()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 199:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    x = torch.randn(16, 64)
    fused = layer(x)
    layer.backend = "reference"
    error = ((fused - layer(x)).norm() / fused.norm()).item()
    print(f"torch backend vs reference: relative error {error:.2e}")


if __name__ == "__main__":
    main()

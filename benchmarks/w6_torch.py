"""W6 / W8: the ResNet-8 of ../shared/bench/workloads.md as a PyTorch module, with the reference weights.

stem conv3x3 (3 -> 16, pad 1, no bias) + BatchNorm + ReLU; three basic residual blocks of 16, 32
(stride 2) and 64 (stride 2) channels (conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut:
identity, or conv1x1 stride 2 + BN where the shape changes, then ReLU); global average pool; Linear 64 -> 10.
The parameter and buffer names are W6_meta.json's (= the W6.onnx initializer names), so
``load_reference`` fills every one of them from ``W6_ref.npz`` / ``W6_eval_ref.npz`` ``init/<name>``
and fails on any name the file lacks or the module does not have.
"""
import numpy as np


def make_module(torch):
    """The ResNet-8 class (built lazily so importing this file needs no torch)."""
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    class ResNet8(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = Block(16, 16, 1)
            self.layer2 = Block(16, 32, 2)
            self.layer3 = Block(32, 64, 2)
            self.fc = nn.Linear(64, classes)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            h = self.layer3(self.layer2(self.layer1(h)))
            return self.fc(h.mean(dim=(2, 3)))

    return ResNet8


def load_reference(torch, ref):
    """A ResNet8 whose parameters and buffers are ``ref["init/<name>"]`` (every state_dict entry)."""
    m = make_module(torch)()
    sd = m.state_dict()
    have = {k[len("init/"):] for k in ref.files if k.startswith("init/")}
    if have != set(sd):
        raise RuntimeError(f"W6 reference init/* names differ from the module's state_dict: only in the file "
                           f"{sorted(have - set(sd))}, only in the module {sorted(set(sd) - have)}")
    m.load_state_dict({k: torch.from_numpy(np.array(ref["init/" + k])) for k in sd})
    return m


def conv_flops(batch):
    """2 x multiply-adds of the 9 convolutions and the Linear of ResNet-8 at ``batch`` (32x32 input): the
    forward count the models README gives (W6 800,104,448 at 32; W8 25,003,264 at 1)."""
    # (c_in, c_out, kernel, output side)
    convs = [(3, 16, 3, 32), (16, 16, 3, 32), (16, 16, 3, 32), (16, 32, 3, 16), (32, 32, 3, 16), (16, 32, 1, 16),
             (32, 64, 3, 8), (64, 64, 3, 8), (32, 64, 1, 8)]
    macs = sum(ci * co * k * k * s * s for ci, co, k, s in convs) + 64 * 10
    return 2 * macs * batch

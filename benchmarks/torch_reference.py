r"""The authors' PyTorch ResNet-32 ETF+DR train step, timed on CPU.

    python benchmarks/torch_reference.py [--batch_size 128] [--threads 2]

A faithful copy of the reference recipe that `experiments.benchmark` times
in JAX (`--backbone resnet32 --method etf_dr --batch_size 128`): the
LDAM/MiSLAS `resnet_cifar` ResNet-32 (option-A `LambdaLayer` shortcuts, BN,
Kaiming-normal convs), the feature head `BatchNorm1d` -> `h / max(||h||,
1e-8)` -> `h @ M` with a fixed simplex ETF `M`, the reference `reg_dot_loss`
(DR) with `GivenEw` per-batch class lengths, mixup (alpha 1), SGD momentum
0.9, weight decay 2e-4. Inputs are random uint8 NHWC batches normalised on
the fly, as in the JAX step. Prints one JSON object.

Install: `pip install torch==2.13.0` (on the dev machines this takes a CPU
build from local disk). Where only PyPI's CUDA-linked Linux wheel is to be
had, `pip install --no-deps torch filelock` and put stub libraries for the
missing CUDA sonames on LD_LIBRARY_PATH (`benchmarks/make_torch_cuda_stubs.py`;
no CUDA function is called on a machine without GPUs). `--channels_last` is
NOT the reference (which runs NCHW) but shows what oneDNN does with NHWC.

`benchmarks/vs_torch.py` runs this and `experiments.benchmark` alternately
and prints the ratio; the measured numbers are in README, Performance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _weights_init(m):
  if isinstance(m, (nn.Linear, nn.Conv2d)):
    nn.init.kaiming_normal_(m.weight)


class LambdaLayer(nn.Module):

  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return self.fn(x)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      # Option A, as the reference: subsample, zero-pad planes//4 each side.
      self.shortcut = LambdaLayer(lambda x: F.pad(
          x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4),
          "constant", 0))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):

  def __init__(self, num_blocks=(5, 5, 5)):
    super().__init__()
    self.in_planes = 16
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.layer1 = self._make_layer(16, num_blocks[0], 1)
    self.layer2 = self._make_layer(32, num_blocks[1], 2)
    self.layer3 = self._make_layer(64, num_blocks[2], 2)
    self.apply(_weights_init)

  def _make_layer(self, planes, n, stride):
    layers = []
    for s in [stride] + [1] * (n - 1):
      layers.append(BasicBlock(self.in_planes, planes, s))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = F.avg_pool2d(out, out.size()[3])
    return out.view(out.size(0), -1)


class ETFClassifier(nn.Module):
  """The reference `ETF_Classifier` feature head: BN1d, L2 norm, fixed M."""

  def __init__(self, feat_in, num_classes, seed=0):
    super().__init__()
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(feat_in, num_classes, generator=g)
    p, _ = torch.linalg.qr(a)
    i = torch.eye(num_classes)
    one = torch.ones(num_classes, num_classes)
    m = math.sqrt(num_classes / (num_classes - 1)) * (p @ (i - one / num_classes))
    self.register_buffer("ori_M", m)
    self.bn = nn.BatchNorm1d(feat_in)

  def forward(self, x):
    x = self.bn(x)
    return x / torch.clamp(torch.sqrt(torch.sum(x ** 2, 1, keepdim=True)), 1e-8)


def produce_ew(label, num_classes):
  uni_label, count = torch.unique(label, return_counts=True)
  gamma = label.size(0) / uni_label.size(0)
  ew = torch.ones(1, num_classes)
  for i in range(uni_label.size(0)):
    ew[0, uni_label[i]] = torch.sqrt(gamma / count[i])
  return ew


def dot_loss(output, label, cur_m, h_length):
  """The reference `reg_dot_loss` (reg_lam = 0)."""
  target = cur_m[:, label].T
  dot = torch.bmm(output.unsqueeze(1), target.unsqueeze(2)).view(-1)
  with torch.no_grad():
    m_length = torch.sqrt(torch.sum(target ** 2, dim=1, keepdim=False))
  return 0.5 * torch.mean(((dot - (m_length * h_length)) ** 2) / h_length)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--channels_last", action="store_true")
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  num_classes, b = 10, args.batch_size
  model, head = ResNet32(), ETFClassifier(64, num_classes)
  mem = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=mem)
  params = list(model.parameters()) + list(head.parameters())
  opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8))
  labels = torch.from_numpy(rng.integers(0, num_classes, b).astype(np.int64))
  mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
  std = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)

  def step():
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    x = ((x - mean) / std).contiguous(memory_format=mem)
    lam = float(np.random.beta(1.0, 1.0))
    index = torch.randperm(b)
    x = lam * x + (1 - lam) * x[index]
    y_a, y_b = labels, labels[index]
    feat = head(model(x))
    cur_m = produce_ew(labels, num_classes) * head.ori_M
    with torch.no_grad():
      h_norm = torch.clamp(torch.sqrt(torch.sum(feat ** 2, dim=1)), 1e-8)
    loss = (lam * dot_loss(feat, y_a, cur_m, h_norm)
            + (1 - lam) * dot_loss(feat, y_b, cur_m, h_norm))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  model.train(); head.train()
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  print(json.dumps({
      "framework": "torch", "torch_version": torch.__version__,
      "threads": torch.get_num_threads(), "batch_size": b,
      "channels_last": args.channels_last,
      "train_step_ms_median": round(1e3 * med, 2),
      "train_step_ms_min": round(1e3 * min(times), 2),
      "train_images_per_sec": round(b / med, 1), "final_loss": loss,
      "timed_steps": args.steps}))


if __name__ == "__main__":
  main()

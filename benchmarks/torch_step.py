"""PyTorch reference timing for one Hinton knowledge-distillation training step.

Measures the wall-clock time of one KD step on CPU with the RepDistiller CIFAR
ResNets: teacher resnet32x4 (eval mode, under ``torch.no_grad()``) and student
resnet8x4 (train mode), on a batch of random 32x32x3 images with 100 classes.
The step is: teacher forward, student forward, loss =
CE(student, labels) + T^2 * KL(softmax(t/T) || softmax(s/T)) (batchmean, T=4),
backward, SGD step (momentum 0.9, lr 0.05, weight decay 5e-4).

The first step is timed separately (the analogue of JAX compile time); then
``--warmup`` untimed steps, then ``--steps`` steps each timed individually.
Reports the median ms/step and examples/s = batch_size / median (plus the
minimum step time, which is more robust when other processes share the CPU).

Run it:

    pip install -e ".[bench]"
    python benchmarks/torch_step.py                 # human-readable table
    python benchmarks/torch_step.py --channels-last --json
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_FILTERS = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """RepDistiller-style CIFAR ResNet with BasicBlocks; depth = 6n + 2."""

    def __init__(self, depth, num_filters=NUM_FILTERS, num_classes=100):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, num_filters[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(num_filters[0]),
            nn.ReLU(inplace=True),
        )
        layers, in_planes = [], num_filters[0]
        for planes, stride in zip(num_filters[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet32x4(num_classes=100):
    return CifarResNet(32, num_classes=num_classes)


def resnet8x4(num_classes=100):
    return CifarResNet(8, num_classes=num_classes)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def kd_loss(s_logits, t_logits, labels, temperature=4.0):
    kl = F.kl_div(
        F.log_softmax(s_logits / temperature, dim=1),
        F.log_softmax(t_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return F.cross_entropy(s_logits, labels) + temperature**2 * kl


def run(batch_size=64, steps=20, warmup=3, channels_last=False, threads=None, seed=0, device="cpu", bf16=False):
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = resnet32x4().to(device=device, memory_format=fmt).eval()
    student = resnet8x4().to(device=device, memory_format=fmt).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, 3, 32, 32).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (batch_size,)).to(device)
    cuda = torch.device(device).type == "cuda"

    def step():
        # bf16: PyTorch's usual mixed precision, float32 parameters and bf16 compute under autocast.
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(student(x).float(), t_logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync(loss):
        if cuda:
            torch.cuda.synchronize()
        return loss.item()  # forces completion of the step

    t0 = time.perf_counter()
    sync(step())
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    # On CPU each step is timed alone; on a GPU, `steps` steps issued back to back over 5 blocks, as
    # benchmarks/distill_step.py times jaxkd there.
    blocks, per_block = (5, steps) if cuda else (steps, 1)
    sync(step())
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            loss = step()
        sync(loss)
        times.append((time.perf_counter() - t0) / per_block)
    ms = 1e3 * statistics.median(times)
    return {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "ms_per_step": round(ms, 3),
        "examples_per_s": round(batch_size / (ms / 1e3), 1),
        "ms_per_step_min": round(1e3 * min(times), 3),
        "first_step_s": round(first_step_s, 4),
        "threads": threads,
        "channels_last": channels_last,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": "bfloat16" if bf16 else "float32",
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "batch_size": batch_size,
        "steps": steps,
        "teacher_params": num_params(teacher),
        "student_params": num_params(student),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 parameters)")
    p.add_argument("--json", action="store_true", help="print one JSON object line")
    args = p.parse_args()
    res = run(args.batch_size, args.steps, args.warmup, args.channels_last, args.threads, device=args.device,
              bf16=args.bf16)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>16}  {v}")


if __name__ == "__main__":
    main()

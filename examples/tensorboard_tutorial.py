#!/usr/bin/env python3
"""
The PyTorch TensorBoard tutorial (pytorch.org/tutorials/intermediate/tensorboard_tutorial),
on synthetic Fashion-MNIST-shaped data so it runs offline in seconds: an image
grid, the model graph, the training loss, histograms of the weights, and a PR
curve per class; with matplotlib, the figure of predictions against labels.

It is written for ``torch.utils.tensorboard``; to see it live in trainstream,
change only the import::

    from trainstream.integrations.tensorboard import SummaryWriter

(or, from a tensorboardX script, ``from tensorboardX import SummaryWriter`` to
the same line). The run is ``fashion_mnist_experiment_1``, as TensorBoard shows
``runs/fashion_mnist_experiment_1``. ``$TRAINSTREAM_URL`` publishes to a
running server; without it the embedded one starts (``python -m trainstream``
prints its dashboard URL). ``add_graph`` and ``add_embedding`` warn once:
trainstream does not show graphs or projections.

    python examples/tensorboard_tutorial.py [--epochs N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F  # noqa: N812 (the tutorial's name)
from torch import nn
from torch.utils.tensorboard import SummaryWriter

try:  # the tutorial's figures, when matplotlib is installed
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle Boot")  # fmt: skip


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def plot_classes_preds(net: nn.Module, images: torch.Tensor, labels: torch.Tensor):  # type: ignore[no-untyped-def]
    """The tutorial's figure: each image with its predicted class, green if right."""
    with torch.no_grad():
        probs = F.softmax(net(images), dim=1)
    fig = plt.figure(figsize=(8, 2.5))
    for idx in range(4):
        ax = fig.add_subplot(1, 4, idx + 1, xticks=[], yticks=[])
        ax.imshow(images[idx, 0].numpy(), cmap="Greys")
        p, label = probs[idx].max(0)
        right = int(label) == int(labels[idx])
        title = (
            f"{CLASSES[int(label)]}, {float(p) * 100:.1f}%\n(label: {CLASSES[int(labels[idx])]})"
        )
        ax.set_title(title, color="green" if right else "red")
    return fig


def batches(generator: torch.Generator, count: int, size: int = 4):  # type: ignore[no-untyped-def]
    """Synthetic 28x28 images whose class shows in their brightness pattern."""
    for _ in range(count):
        labels = torch.randint(0, 10, (size,), generator=generator)
        images = torch.rand(size, 1, 28, 28, generator=generator) * 0.3
        for i, label in enumerate(labels.tolist()):
            images[i, 0, 2 * label : 2 * label + 6, :] += 0.7
        yield images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100, help="batches per epoch")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    writer = SummaryWriter("runs/fashion_mnist_experiment_1")
    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    # Images: a grid of a batch (the tutorial makes it with torchvision's make_grid)
    images, labels = next(batches(generator, 1, 16))
    writer.add_images("four_fashion_mnist_images", images)
    # The model's graph (trainstream warns once: not shown)
    writer.add_graph(net, images)
    # A projector of the features (trainstream warns once: not shown)
    writer.add_embedding(images.view(-1, 28 * 28), metadata=[CLASSES[i] for i in labels])

    running_loss = 0.0
    step = 0
    for _epoch in range(args.epochs):
        for i, (inputs, targets) in enumerate(batches(generator, args.batches)):
            optimizer.zero_grad()
            loss = criterion(net(inputs), targets)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            step += 1
            if i % 10 == 9:
                writer.add_scalar("training loss", running_loss / 10, step)
                running_loss = 0.0
        for name, param in net.named_parameters():
            writer.add_histogram(name, param, step)
        if plt is not None:
            figure = plot_classes_preds(net, inputs, targets)
            writer.add_figure("predictions vs. actuals", figure, global_step=step)

    # PR curves, one per class, on held-out batches
    net.eval()
    with torch.no_grad():
        probs, truth = [], []
        for inputs, targets in batches(generator, 25):
            probs.append(F.softmax(net(inputs), dim=1))
            truth.append(targets)
    test_probs, test_labels = torch.cat(probs), torch.cat(truth)
    for index, name in enumerate(CLASSES):
        writer.add_pr_curve(name, test_labels == index, test_probs[:, index], global_step=0)
    writer.close()
    print(f"logged {step} steps")


if __name__ == "__main__":
    main()

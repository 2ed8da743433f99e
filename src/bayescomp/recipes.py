"""Per-model defaults for the paper's benchmarks: thresholds, variance clamps, data set.

Each value says where it comes from; a user's command-line flag always wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    dataset: str
    #: log α thresholds per layer and prior (missing: the prior's default)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    #: σ² clamp per layer name (the paper's code clamps the first layer at 0.04)
    max_var: dict[str, float] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # thresholds: the official tutorial's LeNet-300-100 example, [-2.8, -3, -5] for fc1..fc3
    "lenet300": Recipe("mnist", {"gnj": {"fc1": -2.8, "fc2": -3.0, "fc3": -5.0}}, {"fc1": 0.04}),
    "lenet5": Recipe("mnist", {}, {"conv1": 0.04}),
    "vgg16": Recipe("cifar10", {}, {}),
    # graph models (residual sums, concatenation): the priors' default thresholds, no variance clamp
    "resnet20": Recipe("cifar10", {}, {}),
    "resnet18_cifar": Recipe("cifar10", {}, {}),
    "resnet_mnist": Recipe("mnist", {}, {}),
    "concat_net": Recipe("cifar10", {}, {}),
}


def recipe(model: str) -> Recipe:
    """The recipe of a registry model (an empty one for models without defaults)."""
    return RECIPES.get(model, Recipe("mnist"))

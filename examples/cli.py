"""LightningCLI: ``EscapeCallback``, its detector, classifier and ladders configured from YAML.

``examples/cli_config.yaml`` configures an ``EscapeCallback`` with a nested ``StallDetector`` (which
holds a nested ``StallClassifier``) and a ladder of escape steps per kind of stall, each given by
``class_path`` and ``init_args``; the model is ``DeepLinear`` from ``lightning_escape.demos.problems``
(four linear layers initialised at 1e-3: a plateau that plain SGD does not leave). Any value can be
overridden on the command line, as with every LightningCLI. After ``fit`` the script prints what the
callback diagnosed and did, and where the TensorBoard logs are.

Run it from the repository root (needs jsonargparse: ``pip install "lightning-escape[cli]"``)::

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_steps 50
    python examples/cli.py fit --help               # every argument, the callbacks' included
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.cli import LightningCLI

from lightning_escape import EscapeCallback
from lightning_escape.demos.problems import DeepLinear


class EscapeCLI(LightningCLI):
    """LightningCLI that prints the escape callback's diagnoses and events after ``fit``."""

    def after_fit(self) -> None:
        trainer = self.trainer
        model = self.model
        assert isinstance(model, DeepLinear)
        print(
            f"\nTrained {trainer.global_step} steps: loss {model.metric():.4g} "
            f"(target {model.target:.4g}, solved: {model.solved()})"
        )
        for escape in (c for c in trainer.callbacks if isinstance(c, EscapeCallback)):
            print(f"Configured: {escape!r}")
            for kind, ladder in escape.policy.ladders.items():
                print(f"  ladder {kind}: {[step.describe() for step in ladder]}")
            for d in escape.diagnoses:
                print(f"diagnosis at step {d.step}: {d.kind}: {d.reason}")
            for e in escape.events:
                print(f"escape at step {e.step}: {e.action} against {e.diagnosis} -> {e.verdict}")
        if trainer.log_dir is not None:
            print(f"\nTensorBoard logs (and the config used, config.yaml): {trainer.log_dir}")
            print(f"Run report:  lightning-escape report {trainer.log_dir}")


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")
    EscapeCLI(DeepLinear)


if __name__ == "__main__":
    main()

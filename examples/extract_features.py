"""Use a CaiT as a feature extractor: class-token embeddings of a dataset, and a linear probe on them.

`model.forward_head(model.forward_features(image), pre_logits=True)` is the normalised class token, the input
of the classifier (`forward_features` gives every token, class token first, as timm's). This script
embeds every image of the digits with `jax.vmap` under `eqx.filter_jit`, fits a logistic regression on the
training embeddings (scikit-learn), and reports its test accuracy next to that of a randomly initialised
model of the same shape — how much of the probe's accuracy the training put into the features.

    python examples/train_digits.py --out runs/digits                     # a trained model first
    python examples/extract_features.py --checkpoint runs/digits/model.safetensors
    python examples/extract_features.py --quick                           # random model only (CI)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Float, Shaped, jaxtyped

import cait_eqx
from cait_eqx.data import load_digits, to_unit_float, train_test_split
from cait_eqx.training import DEFAULT_MODEL


@eqx.filter_jit
@jaxtyped(typechecker=beartype)
def embed(
    model: cait_eqx.CaiT, images: Shaped[Array, "batch channels height width"]
) -> Float[Array, "batch dim"]:
    """Class-token features of a batch of uint8 images (inference mode: no dropout, no key)."""
    model = eqx.nn.inference_mode(model)
    tokens = jax.vmap(model.forward_features)(to_unit_float(images))  # (batch, 1 + patches, dim)
    return jax.vmap(lambda t: model.forward_head(t, pre_logits=True))(tokens)


def features(model: cait_eqx.CaiT, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Embed a whole dataset in batches of a fixed size (the last one padded), so it compiles once."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(embed(model, jnp.asarray(padded)))[: len(batch)])
    return np.concatenate(out)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression fitted on standardised training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="a model saved by cait_eqx.save (e.g. by train_digits.py)"
    )
    parser.add_argument("--quick", action="store_true", help="random model, 400 images (CI)")
    args = parser.parse_args(argv)

    train, test = train_test_split(load_digits(image_size=16), test_fraction=0.2, seed=0)
    if args.quick:
        train, test = train.subset(np.arange(300)), test.subset(np.arange(100))
    models = {
        "random init": cait_eqx.CaiT(
            image_size=16, channels=1, num_classes=10, **DEFAULT_MODEL, key=jax.random.key(0)
        )
    }
    if args.checkpoint is not None:
        models["trained"] = cait_eqx.load(args.checkpoint)
    for name, model in models.items():
        train_f, test_f = features(model, train.images), features(model, test.images)
        accuracy = linear_probe(train_f, train.labels, test_f, test.labels)
        print(
            f"{name}: features {train_f.shape[1:]} per image; "
            f"linear-probe test accuracy {100 * accuracy:.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

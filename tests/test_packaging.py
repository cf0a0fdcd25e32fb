"""Install extras and version bounds: each accelerator extra forwards to the JAX extra of the same
name (which the installed JAX release offers), and the installed JAX, Flax and Orbax lie inside the
tested bounds pyproject.toml states."""

from importlib.metadata import metadata, requires, version

from packaging.requirements import Requirement

ACCELERATOR_EXTRAS = ("tpu", "cuda12", "cuda13")


def _requirements() -> list[Requirement]:
    return [Requirement(line) for line in requires("qwen-jax")]


def test_accelerator_extras_forward_to_jax():
    ours = metadata("qwen-jax").get_all("Provides-Extra")
    offered_by_jax = metadata("jax").get_all("Provides-Extra")
    for extra in ACCELERATOR_EXTRAS:
        assert extra in ours and extra in offered_by_jax
        [requirement] = [
            r
            for r in _requirements()
            if r.marker and r.marker.evaluate({"extra": extra}) and not r.marker.evaluate({"extra": ""})
        ]
        assert requirement.name == "jax" and requirement.extras == {extra}
        assert not requirement.specifier  # the bounds are stated once, on the base requirement


def test_installed_versions_inside_the_stated_bounds():
    base = {r.name: r for r in _requirements() if r.marker is None}
    for name in ("jax", "flax", "orbax-checkpoint"):
        specifier = base[name].specifier
        assert any(s.operator == "<" for s in specifier), f"{name} has no upper bound"
        assert version(name) in specifier, f"{name} {version(name)} is outside {specifier}"

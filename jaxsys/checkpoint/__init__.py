"""Checkpoints: Orbax saves of the train state, and integrity manifests that make a damaged
step visible before it is restored.

- `manager`: the Orbax manager, save / restore (onto any mesh), resume-step selection,
  compatibility checks, free-space checks;
- `integrity`: sha256 manifests written last, verified before use.

Imports `jaxsys.config` and `jaxsys.model` (for the one parameter-path formatter).
"""

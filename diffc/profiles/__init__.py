"""Target profiles: TOML files saying what a target wants (backend, precision, shapes, sampler ...).

Shipped profiles live next to this file (``diffc profiles`` lists them); a user passes a name or the path
of their own TOML file. :func:`load_profile` validates every field against :data:`SCHEMA` and names the
bad one in its error.
"""

from diffc.profiles.schema import Profile, list_profiles, load_profile

__all__ = ["Profile", "list_profiles", "load_profile"]

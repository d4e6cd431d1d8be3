"""Code a user writes outside adamerge (its tests import it as such: no adamerge file is edited)."""

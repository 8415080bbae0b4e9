"""Depth growth: pure index maps (:mod:`.operators`), the PROP-alpha plan (:mod:`.plan`),
and the growth step as a trainer controller (:mod:`.controller`)."""

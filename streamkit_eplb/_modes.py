"""What a ``record`` call's ``values`` hold (the ``mode`` argument of the ``streamkit_eplb::record`` op)."""

MODE_COUNTS, MODE_CUMULATIVE, MODE_IDS, MODE_IDS_MAPPED = 0, 1, 2, 3

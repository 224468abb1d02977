"""What a ``record`` call's ``values`` hold (the ``mode`` argument of the ``streamkit_eplb::record`` ops).

``MODE_IDS_MAPPED`` picks an expert's replica by vLLM's older rule (the id's flat position in
``topk_ids`` modulo the replica count, vLLM v0.11); ``MODE_IDS_HASHED`` by vLLM's current one (a
Knuth multiplicative hash of the token index, ``((token * 2654435769) & 0xFFFFFFFF) % replicas``).
"""

MODE_COUNTS, MODE_CUMULATIVE, MODE_IDS, MODE_IDS_MAPPED, MODE_IDS_HASHED = 0, 1, 2, 3, 4
MAPPED_MODES = (MODE_IDS_MAPPED, MODE_IDS_HASHED)
KNUTH = 2654435769  # floor(2**32 / golden ratio), vLLM's replica hash multiplier

"""Compressed weights (issue 16): the format, the quantizer and the quantize-on-load cache."""

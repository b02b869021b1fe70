from potq.nn.packed import PackedWeight, QuantEmbedding, QuantLinear

__all__ = ["PackedWeight", "QuantEmbedding", "QuantLinear"]

"""Compressed-tensors checkpoints that vLLM loads: the format (format.py: config and tensor
layouts), the writer (writer.py) and the one reader (reader.py); QuantizedWeight (qweight.py)
is what an algorithm hands them."""
from .format import quant_args_from_dict, quantization_config, weight_format
from .qweight import QuantizedWeight
from .reader import (ShardReader, load_dequantized, load_quantized_weights, read_linear,
                     read_quantization_config)
from .writer import CheckpointWriter, save_checkpoint, tied_aliases

__all__ = ["CheckpointWriter", "QuantizedWeight", "ShardReader", "load_dequantized",
           "load_quantized_weights", "quant_args_from_dict", "quantization_config",
           "read_linear", "read_quantization_config", "save_checkpoint", "tied_aliases",
           "weight_format"]

"""transformers >= 5.23 cannot load an asymmetric pack-quantized checkpoint that
compressed-tensors itself wrote. Needs: torch, transformers, compressed-tensors. CPU, seconds."""
import sys, tempfile, torch, transformers, compressed_tensors
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                             QuantizationScheme, QuantizationStatus,
                                             apply_quantization_config)

print("transformers", transformers.__version__, "compressed-tensors", compressed_tensors.__version__)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)
symmetric = sys.argv[1:] == ["--symmetric"]
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32))
qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                             format="pack-quantized")
apply_quantization_config(model, qconfig)
for module in model.modules():  # a plausible grid: scale 0.01, zero point 8
    if hasattr(module, "weight_scale"):
        module.weight_scale.data.fill_(0.01)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.fill_(0 if symmetric else 8)
        module.quantization_status = QuantizationStatus.FROZEN
compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
compressor.compress_model(model)
folder = tempfile.mkdtemp()
model.save_pretrained(folder)
compressor.update_config(folder)
print("written:", folder)
transformers.AutoModelForCausalLM.from_pretrained(folder)  # raises on >= 5.23 when asymmetric
print("loaded")

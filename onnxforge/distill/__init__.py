"""Run an onnxforge model as a trainable PyTorch module and write what it learned back into the same graph.

`onnxforge.distill.torch_graph` (needs the torch extra) holds `TorchGraph` and `write_back`; importing this
package alone imports no torch.
"""

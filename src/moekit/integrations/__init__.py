"""Bridges from other libraries' MoE layers to moekit's ops.

Each integration lives in its own module and imports its library only there, so
`import moekit` never pulls in an optional dependency:

    moekit.integrations.transformers   Hugging Face transformers ≥ 5.7: an experts
                                       implementation named "moekit" (`register()`),
                                       for 16-bit and fine-grained fp8 experts;
                                       `experts_layout` / `fp8_experts_layout` read
                                       their modules as moekit operands.
"""

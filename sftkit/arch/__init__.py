"""What differs between the architectures of the Qwen family, in one place: a table of facts per
`model_type` (`table`), and one module per trait that needs code (`packed_attention`: attention over
packed rows; `flops`: model FLOPs and MFU). A new generation is one entry in `table.ARCHS`."""

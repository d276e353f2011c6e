"""Build: encoder families (dims, the ANE modules, attention cores, transformers references)."""

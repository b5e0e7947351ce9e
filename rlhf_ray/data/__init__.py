"""Before a model sees a token: user files and their validation, encoding, the tokenizer."""

"""SO8T-Phi3 model code: self-contained remote-code files, copied into every saved checkpoint."""

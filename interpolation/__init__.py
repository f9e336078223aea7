"""First-party interpolation schemes for Δ: repeat (the paper), linear, ema, abg."""

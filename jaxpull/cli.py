import sys; print("cli todo"); sys.exit(1)

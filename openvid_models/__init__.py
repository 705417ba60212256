"""STDiT / MVDiT model code on openvid_kernels ops (arrives with the models issue)."""

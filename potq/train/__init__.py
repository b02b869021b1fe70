"""Training: one loop (:mod:`potq.train.loop`) shared by the char nanoGPT and QAT."""

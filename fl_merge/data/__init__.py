"""Offline datasets that ship inside registry packages (MNIST, scikit-learn's digits, BBC
News, tweets; nothing is downloaded at run time) and the encodings models and tasks share
(`offline`: images as MNIST-normalised tensors, texts as UTF-8 byte tensors).

May import: nothing of fl-merge's own.
"""

"""xmodal.eval"""

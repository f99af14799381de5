"""xmodal.train"""

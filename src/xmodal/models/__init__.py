"""xmodal.models"""

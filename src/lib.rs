pub use ferrolens_model as model;

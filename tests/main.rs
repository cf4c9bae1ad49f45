mod conformance;
mod util;

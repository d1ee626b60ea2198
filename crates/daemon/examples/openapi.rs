//! Prints the API's OpenAPI document (the one `GET /openapi.json` serves).
fn main() {
    match daemon::api::openapi().to_pretty_json() {
        Ok(doc) => println!("{doc}"),
        Err(e) => {
            eprintln!("openapi: {e}");
            std::process::exit(1);
        }
    }
}

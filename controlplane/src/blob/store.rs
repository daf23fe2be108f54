//! Opens the configured object store. Credentials are read here and handed to the
//! client; they are never logged (the store's Display shows account and container only).

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::ObjectStore;

use crate::config::{BlobBackend, BlobConfig};
use crate::Error;

fn read_secret(key: &str, path: &std::path::Path) -> Result<String, Error> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        Error::Blob(format!(
            "blob.{key} {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        return Err(Error::Blob(format!("blob.{key} {}: empty", path.display())));
    }
    Ok(s)
}

/// The object key of mount path `path` under `prefix`, or why it cannot be one.
pub fn object_key(prefix: &str, path: &str) -> Result<object_store::path::Path, String> {
    object_store::path::Path::parse(format!("{prefix}{path}"))
        .map_err(|e| format!("{path:?} cannot be a blob key: {e}"))
}

/// The store of `cfg`, or an error naming the key that is wrong.
pub fn open(cfg: &BlobConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    match cfg.backend {
        BlobBackend::Local => {
            let dir = cfg.path.as_deref().unwrap_or(std::path::Path::new(""));
            let fs = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| Error::Blob(format!("blob.path {}: {e}", dir.display())))?;
            Ok(Arc::new(fs))
        }
        BlobBackend::S3 => {
            // Environment first (AWS_*, web identity, instance metadata), then the config.
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(cfg.container.clone().unwrap_or_default());
            if let Some(r) = &cfg.region {
                b = b.with_region(r);
            }
            if let Some(e) = &cfg.endpoint {
                b = b
                    .with_endpoint(e.trim_end_matches('/'))
                    .with_allow_http(e.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            if let Some(f) = &cfg.key_file {
                let text = read_secret("key_file", f)?;
                let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
                let (Some(id), Some(secret), None) = (lines.next(), lines.next(), lines.next())
                else {
                    return Err(Error::Blob(format!(
                        "blob.key_file {}: for s3 it holds two lines, the access key id and the secret access key",
                        f.display()
                    )));
                };
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            let store = b
                .build()
                .map_err(|e| Error::Blob(format!("blob (s3): {e}")))?;
            Ok(Arc::new(store))
        }
        BlobBackend::Azure => {
            // Environment first (AZURE_STORAGE_*, managed and workload identity), then
            // what the config names explicitly.
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(cfg.container.clone().unwrap_or_default());
            if let Some(a) = &cfg.account {
                b = b.with_account(a);
            }
            if let Some(e) = &cfg.endpoint {
                b = b
                    .with_endpoint(e.trim_end_matches('/').to_owned())
                    .with_allow_http(e.starts_with("http://"));
            }
            if let Some(f) = &cfg.key_file {
                b = b.with_access_key(read_secret("key_file", f)?);
            }
            if let Some(f) = &cfg.sas_file {
                let sas = read_secret("sas_file", f)?;
                let pairs = sas
                    .trim_start_matches('?')
                    .split('&')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => (k.to_owned(), v.to_owned()),
                        None => (kv.to_owned(), String::new()),
                    })
                    .collect::<Vec<_>>();
                b = b.with_sas_authorization(pairs);
            }
            let store = b
                .build()
                .map_err(|e| Error::Blob(format!("blob (azure): {e}")))?;
            Ok(Arc::new(store))
        }
    }
}

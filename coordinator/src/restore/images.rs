//! Step 1, the images: each on the node with the image id the checkpoint recorded (pulled by
//! its pinned digest when missing).

use std::collections::BTreeSet;

use k8s_cri::v1 as cri;
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::trust::policy::{self, NewImage, Violation};

use crate::cri::CriClients;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::spec::ContainerPlan;

use super::*;

/// Every image must be on the node with the image id the checkpoint recorded for its container.
/// An image missing here is pulled by the digest the checkpoint pinned (never by its tag, which
/// may have moved since), and the restored container runs that exact image. Returns what was
/// pulled.
pub(super) async fn check_images(
    clients: &CriClients,
    plan: &mut Plan,
    refused: &dyn Fn(Violation) -> Error,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let images: BTreeSet<String> = plan.containers.iter().map(|(c, _, _)| c.image.clone()).collect();
    let mut pulled = Vec::new();
    for image in images {
        let users: Vec<&ContainerPlan> = plan
            .containers
            .iter()
            .filter(|(c, _, _)| c.image == image)
            .map(|(c, _, _)| c)
            .collect();
        let names = users
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let found = match crate::cri::image_status(clients, &image).await? {
            Some(found) => found,
            None => {
                let pinned = pinned_digest(&plan.manifest, &users, &image, &names)?;
                progress.step(&format!(
                    "pulling image {pinned} (container {names}: {image} is not on this node)"
                ));
                clients
                    .image
                    .clone()
                    .pull_image(cri::PullImageRequest {
                        image: Some(crate::cri::image_spec(&pinned)),
                        auth: None,
                        sandbox_config: None,
                    })
                    .await
                    .map_err(|e| {
                        Error::Refused(format!(
                            "image {image} (container {names}) is not on this node and pulling \
                             {pinned} failed: {}",
                            e.message()
                        ))
                    })?;
                let found = crate::cri::image_status(clients, &pinned).await?.ok_or_else(|| {
                    Error::Refused(format!("image {pinned} is not on this node after its pull"))
                })?;
                for (c, _, _) in plan.containers.iter_mut().filter(|(c, _, _)| c.image == image) {
                    // kubelet's way: the resolved reference to run, the name the pod asked for.
                    if let Some(spec) = c.config.image.as_mut() {
                        spec.image = pinned.clone();
                        spec.user_specified_image = image.clone();
                    }
                }
                pulled.push(pinned);
                found
            }
        };
        for (c, _, _) in plan
            .containers
            .iter()
            .filter(|(c, then, _)| c.image == image && *then == Then::Restore)
        {
            let Some(entry) = plan.manifest.container(&c.name) else {
                continue;
            };
            let new = NewImage {
                name: Some(&image),
                id: Some(&found.id),
                layers: None,
                same_node: false,
            };
            policy::check_image(entry, &new).map_err(refused)?;
        }
    }
    Ok(pulled)
}

/// The digest the checkpoint pinned `image` to, for a pull: one for all its containers, of
/// the image's own repository (a checkpoint cannot make a node pull another repository's image
/// under this name).
pub(super) fn pinned_digest(
    manifest: &Manifest,
    users: &[&ContainerPlan],
    image: &str,
    names: &str,
) -> Result<String> {
    let pins: BTreeSet<&str> = users
        .iter()
        .filter_map(|c| manifest.container(&c.name))
        .filter_map(|e| e.image_digest.as_deref())
        .collect();
    let pinned = match pins.into_iter().collect::<Vec<_>>().as_slice() {
        [] => {
            return Err(Error::Refused(format!(
                "image {image} (container {names}) is not on this node and the checkpoint does \
                 not pin it by digest (it was never pulled from a registry on the node that took \
                 it): pull it first"
            )))
        }
        [one] => (*one).to_owned(),
        many => {
            return Err(Error::Refused(format!(
                "image {image} (container {names}) is not on this node and the checkpoint pins \
                 it to several digests: {}",
                many.join(", ")
            )))
        }
    };
    let well_formed = pinned
        .split_once("@sha256:")
        .is_some_and(|(_, hex)| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed || policy::image_repository(&pinned) != policy::image_repository(image) {
        return Err(Error::Refused(format!(
            "the checkpoint pins image {image} (container {names}) to {pinned:?}, which is not a \
             digest of that repository"
        )));
    }
    Ok(pinned)
}

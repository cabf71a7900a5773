"""torchdistill's losses, transcribed into plain PyTorch functions of tensors.

Source: yoshitomo-matsubara/torchdistill, ``torchdistill/losses/mid_level.py`` at commit
3e4373c45214c5c56eebac481d5bfe8b8735aa05 (the classes ``CCKDLoss``, ``PADL2Loss``, ``KTALoss``,
``AffinityLoss``, ``SRDLoss``, ``DISTLoss``/``DISTPlusLoss``, ``AuxSSKDLoss`` and ``SSKDLoss``). Each
function is the class's ``forward`` with the io-dict look-ups replaced by arguments; the arithmetic is
kept line for line (feature maps NCHW, as there). The tests feed the same random inputs to these and to
jaxkd (NHWC) and compare.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import cosine_similarity


def cckd(student_linear_outputs, teacher_linear_outputs, *, kernel="gaussian", gamma=0.4, max_p=2,
         reduction="batchmean"):
    """``CCKDLoss.forward``."""
    def gaussian_rbf(linear_outputs):
        row_list = []
        for linear_output in linear_outputs:
            row = 1
            right_term = torch.matmul(linear_output, torch.t(linear_outputs))
            for p in range(1, max_p + 1):
                left_term = ((2 * gamma) ** p) / (math.factorial(p))
                row += left_term * (right_term ** p)
            row *= math.exp(-2 * gamma)
            row_list.append(row.squeeze(0))
        return torch.stack(row_list)

    batch_size = teacher_linear_outputs.shape[0]
    if kernel == "bilinear":
        teacher_cc = torch.matmul(teacher_linear_outputs, torch.t(teacher_linear_outputs))
        student_cc = torch.matmul(student_linear_outputs, torch.t(student_linear_outputs))
    else:
        teacher_cc = gaussian_rbf(teacher_linear_outputs)
        student_cc = gaussian_rbf(student_linear_outputs)
    cc_loss = torch.dist(student_cc, teacher_cc, 2)
    return cc_loss / (batch_size ** 2) if reduction == "batchmean" else cc_loss


def pad_l2(student_embed_outputs, teacher_embed_outputs, log_variances, *, eps=1e-6, reduction="mean"):
    """``PADL2Loss.forward``."""
    student_embed_outputs = student_embed_outputs.flatten(1)
    teacher_embed_outputs = teacher_embed_outputs.flatten(1)
    squared_losses = torch.mean(
        (teacher_embed_outputs - student_embed_outputs) ** 2 / (eps + torch.exp(log_variances))
        + log_variances, dim=1
    )
    return squared_losses.mean() if reduction == "mean" else squared_losses.sum()


def kta(feature_adapter_outputs, knowledge_translator_outputs, *, p=1, q=2, reduction="mean"):
    """``KTALoss.forward``."""
    knowledge_translator_flat_outputs = knowledge_translator_outputs.flatten(1)
    feature_adapter_flat_outputs = feature_adapter_outputs.flatten(1)
    norm_knowledge_translator_flat_outputs = \
        knowledge_translator_flat_outputs / knowledge_translator_flat_outputs.norm(p=q, dim=1).unsqueeze(1)
    norm_feature_adapter_flat_outputs = \
        feature_adapter_flat_outputs / feature_adapter_flat_outputs.norm(p=q, dim=1).unsqueeze(1)
    if p == 1:
        return nn.functional.l1_loss(
            norm_feature_adapter_flat_outputs, norm_knowledge_translator_flat_outputs, reduction=reduction
        )
    kta_loss = torch.norm(norm_feature_adapter_flat_outputs - norm_knowledge_translator_flat_outputs, p, dim=1)
    return kta_loss.mean() if reduction == "mean" else kta_loss.sum()


def affinity(student_outputs, teacher_outputs, *, reduction="mean"):
    """``AffinityLoss.forward`` (NCHW maps)."""
    student_flat_outputs = student_outputs.flatten(2)
    teacher_flat_outputs = teacher_outputs.flatten(2)
    batch_size, ch_size, hw = student_flat_outputs.shape
    student_flat_outputs = student_flat_outputs / student_flat_outputs.norm(p=2, dim=2).unsqueeze(-1)
    teacher_flat_outputs = teacher_flat_outputs / teacher_flat_outputs.norm(p=2, dim=2).unsqueeze(-1)
    total_squared_losses = torch.zeros(batch_size, dtype=student_flat_outputs.dtype)
    for i in range(ch_size):
        total_squared_losses += (
            (torch.bmm(student_flat_outputs[:, i].unsqueeze(2), student_flat_outputs[:, i].unsqueeze(1))
             - torch.bmm(teacher_flat_outputs[:, i].unsqueeze(2), teacher_flat_outputs[:, i].unsqueeze(1))) / hw
        ).norm(p=2, dim=(1, 2))
    return total_squared_losses.mean() if reduction == "mean" else total_squared_losses.sum()


def srd(student_features, teacher_features, student_logits, teacher_logits, *, exponent=1.0, temperature=1.0):
    """``SRDLoss.forward`` (``reduction="batchmean"``); returns ``(loss, feature term)``."""
    diff_features = torch.abs(student_features - teacher_features)
    feat_distill_loss = torch.log(diff_features.pow(exponent).sum())
    kl_loss = nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(student_logits / temperature, dim=1),
                                                  torch.softmax(teacher_logits / temperature, dim=1))
    return 2 * feat_distill_loss + kl_loss, feat_distill_loss


def _inter_class_relation(y_s, y_t, eps):
    """``DISTLoss.inter_class_relation``."""
    pearson = cosine_similarity(y_s - y_s.mean(1).unsqueeze(1), y_t - y_t.mean(1).unsqueeze(1), eps=eps)
    return 1 - pearson.mean()


def dist_plus_channel_relation(f_s, f_t, eps=1e-8):
    """``DISTPlusLoss.channel_relation`` (NCHW)."""
    c_mean_f_s = torch.mean(f_s, dim=1, keepdim=True)
    c_mean_f_t = torch.mean(f_t, dim=1, keepdim=True)
    c_centered_f_s = f_s - c_mean_f_s
    c_centered_f_t = f_t - c_mean_f_t
    numerator = torch.sum(c_centered_f_s * c_centered_f_t, dim=1)
    denominator = torch.sqrt(torch.sum(c_centered_f_s ** 2, dim=1) * torch.sum(c_centered_f_t ** 2, dim=1))
    return (numerator / (denominator + eps)).mean()


def dist_plus_spatial_relation(f_s, f_t, eps=1e-8):
    """``DISTPlusLoss.spatial_relation`` (NCHW)."""
    aggregated_f_s = torch.sum(f_s, dim=1).flatten(1)
    aggregated_f_t = torch.sum(f_t, dim=1).flatten(1)
    return _inter_class_relation(aggregated_f_s.transpose(0, 1), aggregated_f_t.transpose(0, 1), eps)


def dist_plus(student_logits, teacher_logits, f_s, f_t, *, beta=1.0, gamma=1.0, iota=1.0, kappa=1.0, tau=1.0,
              eps=1e-8):
    """``DISTPlusLoss.forward``: DIST's ``β·inter + γ·intra`` (with ``τ²``) + ``ι·channel + κ·spatial``."""
    y_s = (student_logits / tau).softmax(dim=1)
    y_t = (teacher_logits / tau).softmax(dim=1)
    inter_loss = tau ** 2 * _inter_class_relation(y_s, y_t, eps)
    intra_loss = tau ** 2 * _inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1), eps)
    dist_loss = beta * inter_loss + gamma * intra_loss
    return (dist_loss + iota * dist_plus_channel_relation(f_s, f_t, eps)
            + kappa * dist_plus_spatial_relation(f_s, f_t, eps))


def aux_sskd(ss_module_outputs, *, reduction="mean"):
    """``AuxSSKDLoss.forward`` (``4N`` rows, image-major, view 0 of each image the unrotated one)."""
    batch_size = ss_module_outputs.shape[0]
    three_forth_batch_size = int(batch_size * 3 / 4)
    one_forth_batch_size = batch_size - three_forth_batch_size
    normal_indices = (torch.arange(batch_size) % 4 == 0)
    aug_indices = (torch.arange(batch_size) % 4 != 0)
    normal_rep = ss_module_outputs[normal_indices]
    aug_rep = ss_module_outputs[aug_indices]
    normal_rep = normal_rep.unsqueeze(2).expand(-1, -1, three_forth_batch_size).transpose(0, 2)
    aug_rep = aug_rep.unsqueeze(2).expand(-1, -1, one_forth_batch_size)
    cos_similarities = cosine_similarity(aug_rep, normal_rep, dim=1)
    targets = torch.arange(one_forth_batch_size).unsqueeze(1).expand(-1, 3).contiguous().view(-1)
    targets = targets[:three_forth_batch_size].long()
    return nn.CrossEntropyLoss(reduction=reduction)(cos_similarities, targets)


def _sskd_cosine_similarities(ss_module_outputs, normal_indices, aug_indices, three_forth_batch_size,
                              one_forth_batch_size):
    """``SSKDLoss.compute_cosine_similarities``."""
    normal_feat = ss_module_outputs[normal_indices]
    aug_feat = ss_module_outputs[aug_indices]
    normal_feat = normal_feat.unsqueeze(2).expand(-1, -1, three_forth_batch_size).transpose(0, 2)
    aug_feat = aug_feat.unsqueeze(2).expand(-1, -1, one_forth_batch_size)
    return cosine_similarity(aug_feat, normal_feat, dim=1)


def sskd(student_linear_outputs, teacher_linear_outputs, student_ss_module_outputs, teacher_ss_module_outputs,
         targets, *, kl_temp, ss_temp, tf_temp, ss_ratio, tf_ratio, loss_weights=None, reduction="batchmean"):
    """``SSKDLoss.forward``; returns ``(total, [ce, kl, ss, tf])``."""
    loss_weights = [1.0, 1.0, 1.0, 1.0] if loss_weights is None else loss_weights
    cross_entropy_loss = nn.CrossEntropyLoss(reduction="mean" if reduction == "batchmean" else reduction)
    kldiv_loss = nn.KLDivLoss(reduction=reduction)
    batch_size = student_linear_outputs.shape[0]
    three_forth_batch_size = int(batch_size * 3 / 4)
    one_forth_batch_size = batch_size - three_forth_batch_size
    normal_indices = (torch.arange(batch_size) % 4 == 0)
    aug_indices = (torch.arange(batch_size) % 4 != 0)
    ce_loss = cross_entropy_loss(student_linear_outputs[normal_indices], targets)
    kl_loss = kldiv_loss(
        torch.log_softmax(student_linear_outputs[normal_indices] / kl_temp, dim=1),
        torch.softmax(teacher_linear_outputs[normal_indices] / kl_temp, dim=1)
    )
    kl_loss *= (kl_temp ** 2)

    # error level ranking
    aug_knowledges = torch.softmax(teacher_linear_outputs[aug_indices] / tf_temp, dim=1)
    aug_targets = targets.unsqueeze(1).expand(-1, 3).contiguous().view(-1)
    aug_targets = aug_targets[:three_forth_batch_size].long()
    ranks = torch.argsort(aug_knowledges, dim=1, descending=True)
    ranks = torch.argmax(torch.eq(ranks, aug_targets.unsqueeze(1)).long(), dim=1)  # groundtruth label's rank
    indices = torch.argsort(ranks)
    tmp = torch.nonzero(ranks, as_tuple=True)[0]
    wrong_num = tmp.numel()
    correct_num = three_forth_batch_size - wrong_num
    wrong_keep = int(wrong_num * tf_ratio)
    indices = indices[:correct_num + wrong_keep]
    distill_index_tf = torch.sort(indices)[0]

    s_cos_similarities = _sskd_cosine_similarities(
        student_ss_module_outputs, normal_indices, aug_indices, three_forth_batch_size, one_forth_batch_size
    )
    t_cos_similarities = _sskd_cosine_similarities(
        teacher_ss_module_outputs, normal_indices, aug_indices, three_forth_batch_size, one_forth_batch_size
    )
    t_cos_similarities = t_cos_similarities.detach()

    aug_targets = torch.arange(one_forth_batch_size).unsqueeze(1).expand(-1, 3).contiguous().view(-1)
    aug_targets = aug_targets[:three_forth_batch_size].long()
    ranks = torch.argsort(t_cos_similarities, dim=1, descending=True)
    ranks = torch.argmax(torch.eq(ranks, aug_targets.unsqueeze(1)).long(), dim=1)  # groundtruth label's rank
    indices = torch.argsort(ranks)
    tmp = torch.nonzero(ranks, as_tuple=True)[0]
    wrong_num = tmp.numel()
    correct_num = three_forth_batch_size - wrong_num
    wrong_keep = int(wrong_num * ss_ratio)
    indices = indices[:correct_num + wrong_keep]
    distill_index_ss = torch.sort(indices)[0]

    ss_loss = kldiv_loss(
        torch.log_softmax(s_cos_similarities[distill_index_ss] / ss_temp, dim=1),
        torch.softmax(t_cos_similarities[distill_index_ss] / ss_temp, dim=1)
    )
    ss_loss *= (ss_temp ** 2)
    log_aug_outputs = torch.log_softmax(student_linear_outputs[aug_indices] / tf_temp, dim=1)
    tf_loss = kldiv_loss(log_aug_outputs[distill_index_tf], aug_knowledges[distill_index_tf])
    tf_loss *= (tf_temp ** 2)
    terms = [ce_loss, kl_loss, ss_loss, tf_loss]
    total_loss = 0
    for loss_weight, loss in zip(loss_weights, terms):
        total_loss += loss_weight * loss
    return total_loss, terms
